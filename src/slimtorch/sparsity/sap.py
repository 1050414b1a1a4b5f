"""PQ Index and SAP (Diao et al., "Pruning Deep Neural Networks from a Sparsity Perspective",
ICLR 2023): measure how compressible each layer's remaining weights are, and prune each layer
by as much as that says, round after round.

PQ Index of the d remaining weights w of a layer (0 < p < q): I(w) = 1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q,
with p = 0.5, q = 1 — 0 for weights of equal magnitude, towards 1 as a few weights dominate.
SAP (sparsity-informed adaptive pruning), one round per call of this method: the number of
weights worth keeping is m = d·(1 + η)^{−q/(q−p)}·(1 − I)^{qp/(q−p)}, and the layer prunes
⌊d·clip(γ·(1 − m/d), 0, β)⌋ more of its remaining weights, the smallest |w| (η = 1e-3, γ = 1.2,
β = 0.9, the values the notes give; the paper's Algorithm 1). The paper iterates prune → retrain;
a recipe does the same by listing rounds: ``[sap, srste, sap, srste]`` (``srste`` then keeps
each layer's pruned count while it trains). We follow the layer-wise variant (each layer its own
I and ratio), which is what makes the budget adaptive per layer; data-free.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..methods import MethodContext, register_method
from .base import SparsityConfig, record
from .masks import mask_sparsity, prune_lowest, targets


class SAPConfig(SparsityConfig):
    p: float = Field(0.5, gt=0, description="PQ Index p (0 < p < q)")
    q: float = Field(1.0, gt=0, description="PQ Index q")
    eta: float = Field(1e-3, ge=0, description="η of the kept-count bound m")
    gamma: float = Field(1.2, gt=0, description="γ: scale of the prune ratio")
    beta: float = Field(0.9, gt=0, lt=1, description="β: the most a layer prunes in a round")

    @model_validator(mode="after")
    def _one_pattern(self):  # replaces SparsityConfig's: SAP computes its own ratios
        if self.sparsity is not None or self.pattern not in (None, "unstructured") or self.ratios:
            raise ValueError("SAP sets each layer's ratio from its PQ Index: give no sparsity, "
                             "pattern or ratios (tune gamma/beta instead)")
        if not self.p < self.q:
            raise ValueError(f"the PQ Index needs 0 < p < q, got p={self.p}, q={self.q}")
        return self


def pq_index(w: Tensor, p: float = 0.5, q: float = 1.0) -> float:
    """I(w) = 1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q of the d entries of ``w``."""
    a = w.detach().double().abs().reshape(-1)
    d = a.numel()
    norm_p, norm_q = a.pow(p).sum().pow(1 / p), a.pow(q).sum().pow(1 / q)
    if norm_q == 0:
        return 0.0
    return float(1 - d ** (1 / q - 1 / p) * norm_p / norm_q)


def sap_ratio(index: float, p: float = 0.5, q: float = 1.0, eta: float = 1e-3,
              gamma: float = 1.2, beta: float = 0.9) -> float:
    """The fraction of a layer's remaining weights SAP prunes given its PQ Index:
    clip(γ·(1 − m/d), 0, β) with m/d = (1 + η)^{−q/(q−p)}·(1 − I)^{qp/(q−p)}."""
    keep = (1 + eta) ** (-q / (q - p)) * (1 - index) ** (q * p / (q - p))
    return min(max(gamma * (1 - keep), 0.0), beta)


@register_method("sap", SAPConfig)
@torch.no_grad()
def apply(model, cfg: SAPConfig, ctx: MethodContext) -> dict[str, Any]:
    layers, skipped = targets(model, cfg)
    stats = {}
    for f, layer, _ in layers:
        w = layer.weight.detach()
        keep = (torch.ones_like(w, dtype=torch.bool) if layer.weight_mask is None
                else layer.weight_mask.clone())
        kept = w[keep]
        index = pq_index(kept, cfg.p, cfg.q)
        ratio = sap_ratio(index, cfg.p, cfg.q, cfg.eta, cfg.gamma, cfg.beta)
        cut = prune_lowest(kept.abs(), ratio)  # among the remaining weights only
        keep[keep.clone()] = cut
        layer.set_weight_mask(keep)
        stats[f] = {"pq_index": round(index, 6), "round_ratio": round(ratio, 6),
                    "pruned_now": int(kept.numel() - cut.sum()),
                    "sparsity": mask_sparsity(keep)}
    return record(model, stats, skipped)

