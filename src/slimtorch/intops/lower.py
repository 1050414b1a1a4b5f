"""``lower_to_int8``: run a quantized model's Linear layers in integers inside PyTorch.

Every frozen QuantLinear with symmetric ≤ 8-bit weights (per tensor or per output channel) and a
per-tensor ≤ 8-bit input quantizer is replaced by an ``IntLinear`` (int8 × int8 → int32 through
``torch._int_mm``). The swap is done in place; ``copy.deepcopy`` the model first when the
fake-quant model is needed as well.

Attention matmuls stay in fake quant: at the zoo's and MiniLM's sequence lengths they are ~2 % of
the multiply-adds, and ``torch._int_mm`` has no batched form.
"""
from __future__ import annotations

from torch import nn

from ..graph.rewrite import set_submodule
from ..quant.modules import QuantLayerMixin
from ..quant.prepare import SITES_ATTR
from ..quant.quantizer import Quantizer
from .linear import IntLinear, int8_eligible


def lower_to_int8(qmodel: nn.Module, *, output_grids: dict[str, Quantizer] | None = None
                  ) -> nn.Module:
    """Swap eligible layers of ``qmodel`` for IntLinear (in place) and return it.

    output_grids: optional {layer fqn: per-tensor quantizer} onto whose grid that layer's
    output is requantised with a dyadic multiplier (e.g. the quantizer that reads it next).
    """
    grids = output_grids or {}
    for fqn, mod in list(qmodel.named_modules()):
        if fqn and int8_eligible(mod) is None:
            set_submodule(qmodel, fqn, IntLinear(mod, grids.get(fqn)))
    sites = getattr(qmodel, SITES_ATTR, None)
    if sites is not None:  # the new modules must take part in naming the sites
        sites.reinstall(qmodel)
    return qmodel


def lowering_summary(model: nn.Module) -> dict[str, list]:
    """Which layers run in integers, and why the other quantized layers do not."""
    out: dict[str, list] = {"int8": [], "fake_quant": []}
    for fqn, mod in model.named_modules():
        if isinstance(mod, IntLinear):
            out["int8"].append(fqn)
        elif isinstance(mod, QuantLayerMixin):
            reason = int8_eligible(mod) or "eligible (not lowered yet)"
            out["fake_quant"].append({"layer": fqn, "type": type(mod).__name__,
                                      "reason": reason})
    return out
