"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", ICML 2023): prune a layer column by column and spread each pruned (and, with a
weight quantizer, each rounded) weight's error over the columns not yet visited, by the inverse
Hessian of the layer-wise problem min ‖W X − Ŵ X‖² — GPTQ's machinery
(``algorithms.gptq.gptq`` with its ``prune`` hook), so sparsity and quantization run in one
pass when the recipe also quantizes weights (the paper's joint mode).

Per layer: H = 2/N Σ x xᵀ (``GPTQSolver``), damped by 1 % of its mean diagonal, U =
chol(H⁻¹)ᵀ; in blocks of ``block_size`` (128) columns:
- unstructured: at the start of each block, the weights w with the lowest w²/U_jj² over the
  whole block (all rows together, ⌊s·rows·128⌋ of them) are pruned — the public code's
  adaptive mask selection per block;
- N:M: at every M-th column, in each row the M − N lowest w²/U_jj² of the next M columns.
  A convolution's groups run along its input channels, so its columns are visited in
  (kh, kw, C) order (H permuted alike) and every M consecutive columns are M input channels
  of one kernel tap;
- then column by column as in GPTQ: q = 0 where pruned, else w (or Q(w) on the layer's grid),
  error e = (w − q)/U_ii, later columns −= e·U_i,>i.
Grids of per-group weight quantizers are fitted at each group's first column on the current
weights, the pruned ones included, as the public code does (``quantizer.find_params`` before
the zeroing). Statistics: the proxy error tr(ΔW H ΔWᵀ) of the same mask without the update
(``mask_error``) and with it (``error``), and the gain in dB.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..algorithms.gptq import GPTQSolver, gptq, proxy_error, unsolvable, unsupported
from ..errors import RecipeError
from ..methods import MethodContext, register_method
from .base import SparsityConfig, prune_layerwise, record
from .masks import Pattern, mask_sparsity, nm_view, prune_lowest, select


class SparseGPTConfig(SparsityConfig):
    block_size: int = Field(128, ge=1, description="columns per block (mask and lazy update)")
    damp: float = Field(0.01, gt=0, le=1, description="λ: damping as a fraction of mean diag H")
    sequential: Literal["layer", "unit"] = Field(
        "unit", description="unit: all layers of a residual block from one collection (the "
        "public code); layer: re-collect after each layer")
    max_columns: int | None = Field(65536, ge=1, description="input columns sampled per "
                                    "calibration batch (seeded); None: all")
    # read by GPTQSolver, not settings: SparseGPT visits the columns in order and fits each
    # weight group's grid at its first column
    act_order: ClassVar[bool] = False
    static_groups: ClassVar[bool] = False


def choose_unstructured(sparsity: float):
    """The block's keep-mask: prune the ⌊s·numel⌋ lowest w²/U_jj² of the block."""
    def choose(cols: Tensor, d: Tensor) -> Tensor:                  # [g, r, b], [g, b]
        score = cols.pow(2) / d[:, None, :].pow(2)
        return torch.stack([prune_lowest(sc, sparsity) for sc in score])
    return choose


def choose_nm(n: int, m: int):
    """Keep the n highest w²/U_jj² of the m columns in every row."""
    def choose(cols: Tensor, d: Tensor) -> Tensor:                  # [g, r, m], [g, m]
        score = cols.pow(2) / d[:, None, :].pow(2)
        keep = torch.zeros_like(score, dtype=torch.bool)
        return keep.scatter_(-1, score.topk(n, dim=-1).indices, True)
    return choose


def column_order(layer: nn.Module, pattern: Pattern) -> Tensor | None:
    """A convolution's columns in (kh, kw, C) order for N:M, else None (the natural order)."""
    w = layer.weight
    if not pattern.structured or w.dim() == 2 or w[0, 0].numel() == 1:
        return None
    idx = torch.arange(w[0].numel()).reshape(w.shape[1:])            # [C, kh, kw]
    return nm_view(idx[None])[0].reshape(-1)                          # [(kh, kw, C)]


class SparseGPTSolver(GPTQSolver):
    """H as GPTQ accumulates it; ``solve`` prunes (and quantizes, with a weight quantizer)."""

    def __init__(self, layer: nn.Module, cfg: SparseGPTConfig, pattern: Pattern,
                 sparsity: float, seed: int):
        super().__init__(layer, cfg, seed)
        self.pattern, self.sparsity = pattern, sparsity

    @torch.no_grad()
    def solve(self) -> dict[str, Any]:
        layer, cfg, p = self.layer, self.cfg, self.pattern
        wq = layer.weight_quantizer
        w = layer.weight.detach()
        g, n = self.h.shape[0], self.h.shape[-1]
        if self.count < n:  # H singular: fall back to magnitude at the same pattern
            return {"kept_magnitude": f"{self.count} input columns for {n} inputs",
                    "columns": self.count, "inputs": n}
        h = self.h * (2.0 / self.count)
        wg = w.reshape(g, w.shape[0] // g, -1).float()                  # [g, r, n]
        grid = (None, None, 0, 0)
        if wq is not None:
            grid = (*[t.expand_as(wq.layout(w)).reshape(wg.shape) for t in
                      (wq.scale, wq.zero_point)], wq.qmin, wq.qmax)
        order = column_order(layer, p)
        refit = self._refit(wq) if wq is not None else None
        wp, hp = wg, h
        if order is not None:
            if refit is not None:
                raise RecipeError("SparseGPT N:M on a convolution visits its columns by input "
                                  "channel; per-group weight grids need them in order: use "
                                  "per_channel weights for convolutions")
            wp, hp = wg[..., order], h[:, order][:, :, order]
            if grid[0] is not None:
                grid = (grid[0][..., order], grid[1][..., order], *grid[2:])
        period = p.m if p.structured else cfg.block_size
        if cfg.block_size % period:
            raise RecipeError(f"SparseGPT block_size {cfg.block_size} is not a multiple of "
                              f"M = {period}")
        choose = choose_nm(p.n, p.m) if p.structured else choose_unstructured(self.sparsity)
        q, st = gptq(wp, hp, *grid, block_size=cfg.block_size, damp=cfg.damp,
                     refit=refit, prune=(period, choose))
        keep = st["keep"]
        if order is not None:  # back to the weight's column order
            inv = torch.argsort(order)
            q, keep = q[..., inv], keep[..., inv]
        base, err = proxy_error(wg * keep - wg, h), proxy_error(q - wg, h)
        layer.weight.data.copy_(q.reshape(w.shape).to(w.dtype))
        if refit is not None:  # the quantizer holds the grid the codes were rounded on
            size = refit[0]
            wq.scale = st["scale"][..., ::size].reshape(wq.scale.shape).to(wq.scale.dtype)
            wq.zero_point = st["zero_point"][..., ::size].reshape(wq.zero_point.shape).to(
                wq.zero_point.dtype)
        layer.set_weight_mask(keep.reshape(w.shape))
        gain = 10 * math.log10(base / err) if err > 0 and base > 0 else 0.0
        return {"sparsity": mask_sparsity(keep), "mask_error": base,
                "error": err, "gain_db": round(gain, 2), "damp": st["damp"],
                "quantized": wq is not None, "columns": self.count}


def _why_not(layer: nn.Module) -> str | None:
    """Why SparseGPT cannot solve this layer: GPTQ's reasons when the layer quantizes its
    weights; a layer without a weight quantizer is pruned without rounding."""
    if getattr(layer, "frozen", False):
        return "frozen by an earlier method"
    if layer.weight_quantizer is None:
        return unsolvable(layer)
    return unsupported(layer)


@register_method("sparsegpt", SparseGPTConfig)
def apply(model, cfg: SparseGPTConfig, ctx: MethodContext) -> dict[str, Any]:
    def build(layer: nn.Module, pattern: Pattern, sparsity: float, seed: int):
        return _why_not(layer) or SparseGPTSolver(layer, cfg, pattern, sparsity, seed)
    per_layer, skipped, runner, ratio = prune_layerwise(model, cfg, ctx, build,
                                                        cfg.sequential, "sparsegpt")
    _fallback(model, per_layer, cfg.pattern_obj(), ratio)
    return record(model, per_layer, skipped, runner=runner)


@torch.no_grad()
def _fallback(model, per_layer: dict, pattern: Pattern, ratio: dict) -> None:
    """Layers with too few calibration columns for H: magnitude masks at the same pattern."""
    for f, st in per_layer.items():
        if "kept_magnitude" in st:
            layer = model.get_submodule(f)
            mask = select(layer.weight.detach().abs(), pattern, ratio[f])
            layer.set_weight_mask(mask)
            st["sparsity"] = mask_sparsity(mask)
