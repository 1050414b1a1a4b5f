"""Integer execution inside PyTorch: int8 matmul via ``torch._int_mm`` and dyadic requantisation."""
from .dyadic import dyadic, requantize
from .linear import IntLinear, int8_eligible
from .lower import lower_to_int8, lowering_summary
from .matmul import int8_matmul

__all__ = ["dyadic", "requantize", "IntLinear", "int8_eligible", "lower_to_int8",
           "lowering_summary", "int8_matmul"]
