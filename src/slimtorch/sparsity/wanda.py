"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024): score each weight by |W_ij|·‖X_j‖₂ — its magnitude times the norm of the input
feature it multiplies over the calibration set — and prune the lowest scores of each output
row (the paper's per-output comparison group), or the lowest N of every M inputs; no weight
update.

On the layer-wise runner: each layer's input columns (a Linear's input rows, a convolution's
unfolded patches, ``algorithms.gptq.input_rows``) feed Σ_samples x_j²; as in the public code,
all layers of a residual block are pruned from one collection of the block's inputs
(``sequential: unit``), and the next block sees the pruned block's outputs; ``sequential:
dense`` takes every layer's norms from the dense model instead (as torchao's sparsifier does). The public code
handles Linear layers of LLMs only; for a convolution we use the unfolded patch columns, so
the score is the same formula on the matrix the convolution multiplies.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..algorithms.gptq import input_rows, layer_shape
from ..methods import MethodContext, register_method
from .base import SparsityConfig, prune_layerwise, record
from .masks import Pattern, mask_sparsity, select


class WandaConfig(SparsityConfig):
    sequential: Literal["layer", "unit", "dense"] = Field(
        "unit", description="unit: all layers of a residual block from one collection, the "
        "next block fed by the pruned one (the public code); layer: re-collect after each "
        "layer; dense: every layer's norms from the dense model in one pass (torchao's "
        "WandaSparsifier)")
    max_columns: int | None = Field(65536, ge=1, description="input columns sampled per "
                                    "calibration batch (seeded); None: all")


def wanda_score(w: Tensor, sq_norm: Tensor) -> Tensor:
    """|W_ij|·‖X_j‖₂ for a weight [O, ...] whose rows flatten to the n columns of
    ``sq_norm`` [g, n] (Σ x_j² per group of a grouped conv)."""
    g = sq_norm.shape[0]
    cols = sq_norm.sqrt().repeat_interleave(w.shape[0] // g, dim=0)   # [O, n]
    return w.abs() * cols.reshape(w.shape)


class WandaSolver:
    """Σ x_j² over the layer's input columns, then the mask (``layerwise.LayerSolver``)."""

    def __init__(self, layer: nn.Module, pattern: Pattern, sparsity: float,
                 max_columns: int | None, seed: int):
        self.layer, self.pattern, self.sparsity = layer, pattern, sparsity
        self.max_columns = max_columns
        g, n = layer_shape(layer)
        self.sq = torch.zeros(g, n, dtype=torch.float64)
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add_batch(self, x: Tensor) -> None:
        rows = input_rows(self.layer, x.detach().float(), self.max_columns, self.gen)  # [g,M,n]
        self.sq += rows.double().pow(2).sum(1)
        self.count += rows.shape[1]

    @torch.no_grad()
    def solve(self) -> dict[str, Any]:
        w = self.layer.weight.detach()
        score = wanda_score(w.float(), self.sq.float())
        mask = select(score, self.pattern, self.sparsity, per_row=True)
        self.layer.set_weight_mask(mask)
        return {"sparsity": mask_sparsity(mask), "columns": self.count}

    def free(self) -> None:
        self.sq = None


@register_method("wanda", WandaConfig)
def apply(model, cfg: WandaConfig, ctx: MethodContext) -> dict[str, Any]:
    def build(layer: nn.Module, pattern: Pattern, sparsity: float, seed: int) -> WandaSolver:
        return WandaSolver(layer, pattern, sparsity, cfg.max_columns, seed)
    sequential = "model" if cfg.sequential == "dense" else cfg.sequential
    per_layer, skipped, runner, _ = prune_layerwise(model, cfg, ctx, build, sequential, "wanda")
    return record(model, per_layer, skipped, runner=runner)
