"""``lower_to_int8``: run a quantized model's Linear layers in integers inside PyTorch.

Every frozen QuantLinear with symmetric ≤ 8-bit weights (per tensor or per output channel) and a
per-tensor ≤ 8-bit input quantizer (calibrated, or symmetric dynamic per token / per tensor) is
replaced by an ``IntLinear`` (int8 × int8 → int32 through
``torch._int_mm``). The swap is done in place; ``copy.deepcopy`` the model first when the
fake-quant model is needed as well.

Attention matmuls stay in fake quant: at the zoo's and MiniLM's sequence lengths they are ~2 % of
the multiply-adds, and ``torch._int_mm`` has no batched form.

``lower_packed``: every frozen weight-only QuantLinear (RTN/GPTQ/AWQ W4, W3, W8 weight-only) is
replaced by a ``PackedLinear`` on PyTorch's packed int4/int8 CPU kernels (bf16 activations), the
fast form of a weight-only LLM for batch-1 decoding (``bench/llm_speed.py``).
"""
from __future__ import annotations

from torch import nn

from ..graph.rewrite import set_submodule
from ..quant.modules import QuantLayerMixin
from ..quant.prepare import SITES_ATTR
from ..quant.quantizer import Quantizer
from .linear import IntLinear, int8_eligible
from .packed import PackedLinear, packed_eligible


def _swap(qmodel: nn.Module, make) -> nn.Module:
    """Replace each module for which ``make(fqn, module)`` returns one (in place)."""
    for fqn, mod in list(qmodel.named_modules()):
        new = make(fqn, mod) if fqn else None
        if new is not None:
            set_submodule(qmodel, fqn, new)
    sites = getattr(qmodel, SITES_ATTR, None)
    if sites is not None:  # the new modules must take part in naming the sites
        sites.reinstall(qmodel)
    return qmodel


def lower_to_int8(qmodel: nn.Module, *, output_grids: dict[str, Quantizer] | None = None
                  ) -> nn.Module:
    """Swap eligible layers of ``qmodel`` for IntLinear (in place) and return it.

    output_grids: optional {layer fqn: per-tensor quantizer} onto whose grid that layer's
    output is requantised with a dyadic multiplier (e.g. the quantizer that reads it next).
    """
    grids = output_grids or {}
    return _swap(qmodel, lambda fqn, mod: IntLinear(mod, grids.get(fqn))
                 if int8_eligible(mod) is None else None)


def lower_packed(qmodel: nn.Module) -> nn.Module:
    """Swap the weight-only quantized Linear layers of ``qmodel`` for PackedLinear (in place)."""
    return _swap(qmodel, lambda fqn, mod: PackedLinear(mod) if packed_eligible(mod) is None
                 else None)


def lower(qmodel: nn.Module) -> nn.Module:
    """The fast form of a quantized model in PyTorch (in place): W8A8 layers on int8
    (``lower_to_int8``), weight-only layers on the packed kernels (``lower_packed``); the rest
    stays fake quant (``lowering_summary`` says which and why)."""
    return lower_packed(lower_to_int8(qmodel))


def lowering_summary(model: nn.Module) -> dict[str, list]:
    """Which layers run in integers, and why the other quantized layers do not."""
    out: dict[str, list] = {"int8": [], "packed": [], "fake_quant": []}
    for fqn, mod in model.named_modules():
        if isinstance(mod, IntLinear):
            out["int8"].append(fqn)
        elif isinstance(mod, PackedLinear):
            out["packed"].append(fqn)
        elif isinstance(mod, QuantLayerMixin):
            reason = ((int8_eligible(mod) if mod.input_quantizer is not None
                       else packed_eligible(mod)) or "eligible (not lowered yet)")
            out["fake_quant"].append({"layer": fqn, "type": type(mod).__name__,
                                      "reason": reason})
    return out
