"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024): protect the weights of salient input channels by scaling them up
before weight-only quantization, and clip weight ranges.

Per scale group (Linear layers reading one tensor X, ``channel_scales``), residual block by
residual block of the graph (attention, MLP) in graph order: one run of the calibration set
through the float model, whose earlier blocks are already scaled and clipped, feeds the
block's groups (the runner's hooks), then each group in order (as llm-awq does per decoder
layer: its inputs collected in one run before it is scaled and clipped):

1. scale search (the public code, mit-han-lab/llm-awq ``auto_scale.py``): with a = mean|X_j|
   over all calibration tokens, for α = k/n, k = 0 … n−1 (n = ``grid``, 20):
   s = a^α clamped at 1e-4, normalised s ← s / √(max s · min s); the loss is the mean squared
   error of the group's outputs X Wᵀ against (X/s)·Q(W·diag(s))ᵀ, Q the layer's weight grid
   (the recipe's weight spec), on a seeded sample of ``max_tokens`` tokens. α = 0 (s = 1) is
   plain round-to-nearest, so the chosen scales never lose to it on that sample.
   Deviation: the public code measures the output of the enclosing sub-module for q/k/v (the
   attention output) and gate/up (the MLP output) and the layer output for o_proj/down_proj;
   we measure every group's own layer outputs (no re-run of sub-modules with their keyword
   arguments). 1/s is folded into the producing op (norm affine; a producing Linear through a
   channel-wise linear path: v_proj → o_proj, up_proj → down_proj), else carried as an
   explicit input scale (``unfoldable: scale``, what the public code does for GELU outputs
   with its ``ScaledActivation``) or the group is left unscaled (``skip``; the public code
   skips o_proj under grouped-query attention).
2. clipping search (``auto_clip.py``): per layer, per output channel and weight group, the
   max |w| shrunk to (1 − i/n)·max for i < ``max_shrink``·n, minimising the squared error of
   that group's partial output on ``clip_tokens`` tokens of X/s. Our addition: per output
   channel, the clip is kept only if the channel's full output error on those tokens does not
   grow (per-group optima need not add up), so clipping never increases the layer's error
   there. The public code skips q/k (by module name); we clip every layer of a group.

The weight (and any activation) ranges are then re-fitted by the pipeline's ``calibrate``; a
following ``gptq`` rounds on those grids. Returned per group: the fold, α, the loss per α,
and per layer the fraction of clipped rows and the error before/after clipping.
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..methods import MethodConfig, MethodContext, register_method
from ..quant.granularity import PerChannel, PerGroup
from ..quant.prepare import calibrate, quant_layers
from .channel_scales import (ChannelStats, ScaleGroup, apply_scales, block_steps,
                             count_folds, fake_weight, float_output, group_error, left_out,
                             relative_change, run_groups, scale_groups, search)


class AWQConfig(MethodConfig):
    grid: int = Field(20, ge=1, description="α candidates k/grid, k < grid")
    clip: bool = Field(True, description="search weight clipping after scaling")
    clip_grid: int = Field(20, ge=1, description="shrink steps 1/clip_grid")
    max_shrink: float = Field(0.5, gt=0, le=1, description="largest shrink of max|w|")
    max_tokens: int = Field(4096, ge=16, description="token rows sampled for the scale search")
    clip_tokens: int = Field(512, ge=16, description="token rows for the clipping search")
    unfoldable: Literal["scale", "skip"] = Field(
        "scale", description="groups with no exact fold: explicit input scale, or skip")


def awq_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^α clamped at 1e-4, normalised by √(max s · min s) (the public code)."""
    s = act_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def clip_weight(w: Tensor, x: Tensor, spec, grid: int = 20, max_shrink: float = 0.5
                ) -> tuple[Tensor, dict[str, float]]:
    """The clipping search of one weight [out, in] on token rows ``x`` [N, in] (module
    docstring, step 2). Returns the clipped weight and the errors before/after."""
    o, n_in = w.shape
    size = spec.gran.size if isinstance(spec.gran, PerGroup) else n_in
    wg = w.reshape(o, n_in // size, size)                              # [O, G, size]
    xg = x.reshape(len(x), n_in // size, size)                         # [N, G, size]
    ref = torch.einsum("ngk,ogk->ong", xg, wg)                         # [O, N, G]
    org_max = wg.abs().amax(-1, keepdim=True)                          # [O, G, 1]
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(max(1, int(max_shrink * grid))):
        mx = org_max * (1 - i / grid)
        qw = fake_weight(spec, torch.clamp(wg, -mx, mx).reshape(o, n_in)).reshape(wg.shape)
        err = (torch.einsum("ngk,ogk->ong", xg, qw) - ref).pow(2).mean(1)[..., None]
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, mx, best_max)
    clipped = torch.clamp(wg, -best_max, best_max).reshape(o, n_in)
    y = x @ w.T
    e_none = (x @ fake_weight(spec, w).T - y).pow(2).mean(0)           # [O]
    e_clip = (x @ fake_weight(spec, clipped).T - y).pow(2).mean(0)
    keep = e_clip <= e_none
    out = torch.where(keep[:, None], clipped, w)
    return out, {"clipped_rows": round(float(keep.float().mean()), 4),
                 "error_before": float(e_none.mean()),
                 "error_after": float(torch.where(keep, e_clip, e_none).mean())}


def clippable(spec) -> bool:
    """Rows quantized independently (per output channel or per group)."""
    return isinstance(spec.gran, PerGroup) or (isinstance(spec.gran, PerChannel)
                                               and spec.gran.axis == 0)


class AWQSolver:
    """Streams mean|X| and a token sample of a group's input; searches and applies s, clips."""

    def __init__(self, model, group: ScaleGroup, cfg: AWQConfig, seed: int):
        self.model, self.group, self.cfg = model, group, cfg
        first = model.get_submodule(group.layers[0])
        self.stats = ChannelStats(first.in_features, max(cfg.max_tokens, cfg.clip_tokens), seed)

    def add_batch(self, x: Tensor) -> None:
        self.stats.add(x)

    def solve(self) -> dict[str, Any]:
        layers = [self.model.get_submodule(f) for f in self.group.layers]
        weights = [l.weight.detach().float() for l in layers]
        specs = [l.weight_quantizer.spec for l in layers]
        x, out = self.stats.rows, self.group.record()
        s = torch.ones(x.shape[1])
        if self.group.fold != "explicit" or self.cfg.unfoldable == "scale":
            xs = x[:self.cfg.max_tokens]
            refs = [xs @ w.T for w in weights]
            alphas = [k / self.cfg.grid for k in range(self.cfg.grid)]
            mean = self.stats.absmean
            alpha, losses = search(alphas, lambda a: group_error(
                xs, weights, awq_scales(mean, a), specs, None, refs))
            s = awq_scales(mean, alpha)
            apply_scales(self.model, self.group, s)
            out.update(alpha=alpha, losses=[round(v, 10) for v in losses])
        else:
            out.update(fold="skipped", alpha=None)
        if self.cfg.clip:
            xc = x[:self.cfg.clip_tokens] / s
            out["clip"] = {f: self._clip(l, xc) for f, l in zip(self.group.layers, layers)}
        return out

    def _clip(self, layer, x: Tensor) -> dict[str, float] | str:
        spec = layer.weight_quantizer.spec
        if not clippable(spec):
            return f"weights quantized {spec.granularity}: rows are not independent"
        w, st = clip_weight(layer.weight.detach().float(), x, spec, self.cfg.clip_grid,
                            self.cfg.max_shrink)
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
        return st

    def free(self) -> None:
        self.stats = None


@register_method("awq", AWQConfig)
def apply(model, cfg: AWQConfig, ctx: MethodContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    quantized = {f for f, m in quant_layers(model)
                 if m.weight_quantizer is not None and not m.frozen}
    groups = scale_groups(model, ctx.batches, quantized)
    seeds = iter(range(ctx.seed * 1_000_003, ctx.seed * 1_000_003 + len(groups)))
    before = None if cfg.clip else float_output(model, ctx.batches[0])
    steps = block_steps(model, ctx.batches, groups)
    done = run_groups(model, steps, lambda g: AWQSolver(model, g, cfg, seed=next(seeds)),
                      ctx.batches, progress=ctx.progress, desc="awq")
    out = {}
    if before is not None:  # scaling alone keeps the float function
        out["float_output_rel_change"] = relative_change(
            before, float_output(model, ctx.batches[0]))
    calibrate(model, ctx.batches, progress=ctx.progress)  # grids of the scaled, clipped weights
    return {"groups": done, "folds": count_folds(done), "blocks": len(steps),
            "skipped": left_out(model, groups, quantized), **out,
            "seconds": round(time.perf_counter() - t0, 2)}
