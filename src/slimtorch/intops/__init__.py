"""Integer execution inside PyTorch: int8 matmul via ``torch._int_mm`` and dyadic requantisation;
weight-only layers on the packed int4/int8 CPU kernels."""
from .dyadic import dyadic, requantize
from .linear import IntLinear, int8_eligible
from .lower import lower, lower_packed, lower_to_int8, lowering_summary
from .matmul import int8_matmul
from .packed import PackedLinear, packed_eligible

__all__ = ["dyadic", "requantize", "IntLinear", "int8_eligible", "lower", "lower_to_int8",
           "lower_packed", "PackedLinear", "packed_eligible", "lowering_summary", "int8_matmul"]
