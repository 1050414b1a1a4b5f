"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", ICML 2023): move activation outliers into the weights.

For a group of Linear layers reading one activation X (``channel_scales``), per input channel j

    s_j = max|X_j|^α / max|W_:,j|^(1−α),   X ← X/s,  W ← W·diag(s)

with max|X_j| over all calibration tokens (streamed by the runner's hooks from one pass of the
float model over the calibration set — smoothing is exact, so no group changes another's
statistics — as the public code's ``get_act_scales``) and
max|W_:,j| over every layer of the group (q/k/v together, gate/up together), both clamped at
1e-5 as the public code (mit-han-lab/smoothquant ``smooth.py``) does. 1/s is folded into the
op that produces X where that is exact (a norm's elementwise affine; with ``targets: all`` also
a producing Linear's rows), else carried as an explicit per-channel input scale of the layers;
each group's choice is in the returned data. Afterwards the pipeline's ``calibrate`` re-fits
every weight and activation range (they were fitted before smoothing).

Settings: ``alpha`` (0.5, the paper's default) or ``auto``: per group, α from
{0.30, 0.35, …, 0.80} with the least mean squared error of the group's outputs when weights
and X/s are fake-quantized with the layers' specs, on a seeded sample of ``max_tokens``
calibration tokens (the paper tunes one α per model on calibration data; the search per
group is our choice). ``targets``: ``norm`` (the paper and the public code: inputs produced by
a normalisation — q/k/v and the first MLP layers) or ``all`` (every activation-quantized
Linear group; folded into a producing Linear where exact, e.g. v_proj → o_proj).
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from ..methods import MethodConfig, MethodContext, register_method
from ..quant.prepare import calibrate, quant_layers
from .channel_scales import (ChannelStats, ScaleGroup, apply_scales, count_folds,
                             float_output, group_error, left_out, relative_change, run_groups,
                             scale_groups, search)

AUTO_GRID = [round(0.3 + 0.05 * k, 2) for k in range(11)]
CLAMP = 1e-5


class SmoothQuantConfig(MethodConfig):
    alpha: float | Literal["auto"] = Field(0.5, description="migration strength in [0, 1], "
                                           "or auto: searched per group")
    targets: Literal["norm", "all"] = Field("norm", description="norm: inputs produced by a "
                                            "normalisation (the paper); all: every group")
    max_tokens: int = Field(2048, ge=16, description="token rows sampled per group for "
                            "alpha: auto")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if v != "auto" and not 0.0 <= v <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1 (or auto), got {v}")
        return v


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float
                     ) -> torch.Tensor:
    """s_j = max|X_j|^α / max_W |W_:,j|^(1−α) over all the group's weights [out, in]."""
    w_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).clamp(min=CLAMP)
    return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=CLAMP)


class SmoothSolver:
    """Streams max|X| (and a token sample for ``auto``) of a group's input, then smooths."""

    def __init__(self, model, group: ScaleGroup, cfg: SmoothQuantConfig, seed: int):
        self.model, self.group, self.cfg = model, group, cfg
        first = model.get_submodule(group.layers[0])
        self.stats = ChannelStats(first.in_features, cfg.max_tokens if cfg.alpha == "auto"
                                  else 0, seed)

    def add_batch(self, x: torch.Tensor) -> None:
        self.stats.add(x)

    def solve(self) -> dict[str, Any]:
        layers = [self.model.get_submodule(f) for f in self.group.layers]
        weights = [l.weight.detach().float() for l in layers]
        act_max = self.stats.absmax.clamp(min=CLAMP)
        alpha, losses = self.cfg.alpha, None
        if alpha == "auto":
            x = self.stats.rows
            w_specs = [l.weight_quantizer.spec for l in layers]
            a_spec = layers[0].input_quantizer.spec
            refs = [x @ w.T for w in weights]
            alpha, losses = search(AUTO_GRID, lambda a: group_error(
                x, weights, smoothing_scales(act_max, weights, a), w_specs, a_spec, refs))
        s = smoothing_scales(act_max, weights, alpha)
        apply_scales(self.model, self.group, s)
        out = {**self.group.record(), "alpha": alpha,
               "act_max_ratio": _ratio(act_max), "smoothed_max_ratio": _ratio(act_max / s)}
        if losses is not None:
            out["alpha_losses"] = [round(v, 8) for v in losses]
        return out

    def free(self) -> None:
        self.stats = None


def _ratio(v: torch.Tensor) -> float:
    """max/median of per-channel maxima: how outlier-dominated the channels are."""
    return round(float(v.max() / v.median().clamp(min=1e-12)), 3)


@register_method("smoothquant", SmoothQuantConfig)
def apply(model, cfg: SmoothQuantConfig, ctx: MethodContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    if ctx.recipe.activations is None:
        return {"skipped": "the recipe quantizes no activations: nothing to smooth"}
    quantized = {f for f, m in quant_layers(model)
                 if m.input_quantizer is not None and m.weight_quantizer is not None}
    groups = [g for g in scale_groups(model, ctx.batches, quantized)
              if cfg.targets == "all" or g.source == "norm"]
    seeds = iter(range(ctx.seed * 1_000_003, ctx.seed * 1_000_003 + len(groups)))
    before = float_output(model, ctx.batches[0])
    done = run_groups(model, [groups], lambda g: SmoothSolver(model, g, cfg, seed=next(seeds)),
                      ctx.batches, progress=ctx.progress, desc="smoothquant")
    change = relative_change(before, float_output(model, ctx.batches[0]))
    calibrate(model, ctx.batches, progress=ctx.progress)  # ranges of the smoothed tensors
    return {"groups": done, "folds": count_folds(done),
            "skipped": left_out(model, groups, quantized),
            "float_output_rel_change": change, "seconds": round(time.perf_counter() - t0, 2)}
