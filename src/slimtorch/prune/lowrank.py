"""Low-rank factorisation of Conv/Linear layers (the decomposition of Trained Rank Pruning, Xu
et al., IJCAI 2019, after Zhang et al.'s channel-wise scheme): a layer's weight reshaped to
W ∈ R^{out × in·k·k} is truncated to rank r by SVD, W ≈ (U_r·√S_r)(√S_r·V_rᵀ), and the layer
becomes two smaller ones run in sequence — a k×k conv in → r (no bias, the original stride,
padding and dilation) and a 1×1 conv r → out with the bias (a Linear: in → r, r → out) — as a
plain ``nn.Sequential``, so the artifact reloads without our code path (``surgery.replay``;
the factorisation itself, ``surgery.factorise``, lives there).

Rank per layer:
* ``energy: e`` — the smallest r keeping a fraction e of Σσ² (TRP's energy criterion);
* ``target: {macs: R}`` — jointly, by the rate–distortion DP of ``prune.rd``: for every layer
  and candidate rank (``levels`` ranks spread over 1 … the break-even rank, plus "keep dense")
  the layer alone is replaced by its rank-r approximation and the output distortion
  δ = mean ‖f − f'‖² measured on calibration inputs; min Σδ under Σ MACs ≤ R·MACs solved by
  ``quant.allocate.allocate``. MACs of a factorised layer are exactly additive (out pixels ×
  (r·in·k² + out·r)), so no bisection is needed.
A layer is factorised only when that lowers its MACs (r < out·in·k² / (in·k² + out)); grouped
and depthwise convs, and layers in ``exclude``, stay. Recovery: the ``recover`` method (KD)
trains the factors. Not built: TRP's training-time part (periodic projection of the full-rank
weights to low rank with the nuclear-norm sub-gradient); we factorise once and fine-tune.
"""
from __future__ import annotations

import math
import re
import time
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import PruningError
from ..eval.distortion import OutputDistortion
from ..graph.capture import call_model, capture
from ..methods import MethodConfig, MethodContext, register_method
from ..quant.allocate import allocate
from .method import Target
from .surgery import count_macs, factorise, layer_costs, matrix_dims, weight_matrix


class LowRankConfig(MethodConfig):
    structural: ClassVar[bool] = True
    shrinks: ClassVar[bool] = True
    energy: float | None = Field(None, gt=0, le=1, description="keep this fraction of Σσ² "
                                 "per layer (instead of a target)")
    target: Target | None = Field(None, description="kept fraction of MACs (or params), "
                                  "ranks by the rate-distortion DP")
    levels: int = Field(16, ge=2, description="target: candidate ranks per layer")
    samples: int = Field(256, ge=1, description="target: calibration inputs δ is measured on")
    exclude: list[str] = Field(default_factory=list,
                               description="layers kept dense (fqn or re:regex)")

    @model_validator(mode="after")
    def _one(self):
        if (self.energy is None) == (self.target is None):
            raise ValueError("give one of energy (e.g. 0.9) or target (e.g. {macs: 0.5})")
        return self


def break_even(mod: nn.Module) -> int:
    """The largest rank whose factorisation has fewer MACs (and weights) than the layer."""
    out, ink = matrix_dims(mod)
    return math.ceil(out * ink / (ink + out)) - 1


def factor_macs(layer_macs: float, mod: nn.Module, rank: int) -> float:
    """MACs of the factorised layer: per output position r·in·k² + out·r instead of out·in·k²."""
    out, ink = matrix_dims(mod)
    return layer_macs / (out * ink) * (rank * ink + out * rank)


def candidates(model: nn.Module, exclude: list[str]) -> dict[str, nn.Module]:
    """Conv2d (groups 1) and Linear layers that can be factorised, in model order."""
    rx = [re.compile(p[3:]) for p in exclude if p.startswith("re:")]
    names = {p for p in exclude if not p.startswith("re:")}
    out = {}
    for fqn, mod in model.named_modules():
        ok = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
        if ok and fqn not in names and not any(r.fullmatch(fqn) for r in rx) \
                and break_even(mod) >= 1:
            out[fqn] = mod
    return out


def energy_rank(mod: nn.Module, energy: float) -> int:
    s2 = torch.linalg.svdvals(weight_matrix(mod)) ** 2
    return int((torch.cumsum(s2, 0) / s2.sum() < energy - 1e-12).sum()) + 1


def _rank_levels(top: int, levels: int) -> list[int]:
    return sorted({max(1, round(top * (i + 1) / levels)) for i in range(levels)})


@torch.no_grad()
def rd_ranks(model: nn.Module, layers: dict[str, nn.Module], costs_all: dict, target: Target,
             ctx: MethodContext, levels: int, samples: int) -> tuple[dict[str, int], dict]:
    """Ranks by the DP (module docstring); 0 = keep dense. ``costs_all``: the model's
    ``layer_costs``. Returns (ranks, record)."""
    base = sum(c["macs"] for c in costs_all.values())
    params0 = sum(p.numel() for p in model.parameters())
    delta = OutputDistortion(model, ctx.batches, samples)
    costs, values, names = [], [], []
    for fqn, mod in layers.items():
        if fqn not in costs_all:
            continue  # not run by the forward pass
        macs = costs_all[fqn]["macs"]
        w0 = mod.weight.detach().clone()
        u, s, vh = torch.linalg.svd(weight_matrix(mod), full_matrices=False)
        cost, value = {0: macs if target.metric == "macs" else float(w0.numel())}, {0: 0.0}
        out, ink = matrix_dims(mod)
        for r in _rank_levels(break_even(mod), levels):
            mod.weight.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(w0.shape).to(w0.dtype))
            value[r] = delta()
            cost[r] = (factor_macs(macs, mod, r) if target.metric == "macs"
                       else float(r * (ink + out)))
        mod.weight.copy_(w0)
        names.append(fqn)
        costs.append(cost)
        values.append(value)
    if not names:
        raise PruningError("low-rank: no Conv2d/Linear layer can be factorised (grouped convs "
                           "and layers in exclude stay dense)")
    total = base if target.metric == "macs" else float(params0)
    fixed = total - sum(c[0] for c in costs)  # what the candidate layers do not cover
    budget = target.ratio * total - fixed
    floor = sum(min(c.values()) for c in costs)
    if budget < floor:
        raise PruningError(f"low-rank: the target {target.metric} {target.ratio} cannot be "
                           f"met: every layer at rank 1 still keeps {(fixed + floor) / total:.3f}"
                           f" of the {target.metric}; raise the target")
    res = allocate([{k: int(round(v)) for k, v in c.items()} for c in costs], values,
                   int(budget), max_states=1 << 16)
    ranks = {f: r for f, r in zip(names, res["bits"])}
    return ({f: r for f, r in ranks.items() if r},
            {"allocation": "rd", "samples": delta.n, "distortion_predicted": res["value"],
             "curves": {f: {str(k): v for k, v in val.items()}
                        for f, val in zip(names, values)}})


@register_method("lowrank", LowRankConfig)
def apply(model, cfg: LowRankConfig, ctx: MethodContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    example = ctx.batches[0]
    costs0 = layer_costs(model, capture(model, example))
    macs0 = sum(c["macs"] for c in costs0.values())
    params0 = sum(p.numel() for p in model.parameters())
    layers = candidates(model, cfg.exclude)
    extra: dict[str, Any] = {}
    if cfg.energy is not None:
        ranks = {f: r for f, m in layers.items()
                 if (r := energy_rank(m, cfg.energy)) <= break_even(m)}
    else:
        ranks, extra = rd_ranks(model, layers, costs0, cfg.target, ctx, cfg.levels,
                                cfg.samples)
    shapes = {f: list(matrix_dims(layers[f])) for f in ranks}
    factorise(model, ranks)
    with torch.no_grad():
        call_model(model, example)
    macs1 = count_macs(model, capture(model, example))
    params1 = sum(p.numel() for p in model.parameters())
    return {"history": {"lowrank": ranks},
            "ranks": {f: {"rank": r, "matrix": shapes[f]} for f, r in ranks.items()},
            "macs": {"before": macs0, "after": macs1, "ratio": round(macs1 / macs0, 4)},
            "params": {"before": params0, "after": params1,
                       "ratio": round(params1 / params0, 4)},
            **extra, "seconds": round(time.perf_counter() - t0, 2)}
