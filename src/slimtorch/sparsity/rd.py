"""Layer-adaptive sparsity by the rate–distortion dynamic program (Xu et al., "Efficient Joint
Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV 2023).

For every layer ℓ a sparsity method prunes, and every ratio r of ``RD_GRID`` (0 %, 5 %, …,
95 %), the layer alone is pruned by magnitude to r and the output distortion
δ_ℓ(r) = mean ‖f(x) − f_ℓ,r(x)‖² is measured on calibration inputs (the model in float, every
other layer dense). The paper shows these distortions add up across layers, so the joint
problem is the multiple-choice knapsack

    min Σ_ℓ δ_ℓ(r_ℓ)   subject to   Σ_ℓ n_ℓ·(1 − r_ℓ) ≤ (1 − s)·Σ_ℓ n_ℓ

(kept weights under the global budget of sparsity s over the pruned layers), solved exactly by
the same dynamic program as the bit allocation (``quant.allocate.allocate``). The result is the
method's per-layer ``ratios`` — a sparsity method with ``allocation: rd`` resolves to its
config with those ratios written out, which the artifact records and a recipe can reuse.

Choices (the paper's code is not what we read): the grid of 20 ratios; δ on up to ``rd_samples``
calibration inputs (256); the distortion of the model output, whatever its form (logits; every
tensor of a tuple/dict output, summed); δ from magnitude masks also when the ratios feed Wanda or
SparseGPT (the paper prunes by magnitude; their masks differ, the ranking of layers much less).
Cost: one forward pass per layer and ratio.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import SlimtorchError
from ..eval.distortion import OutputDistortion
from ..quant.allocate import allocate
from ..quant.prepare import quant_state
from .masks import parse_pattern, select, targets

RD_GRID = tuple(range(0, 100, 5))  # candidate per-layer sparsity, in percent


@torch.no_grad()
def rd_ratios(model, cfg, ctx) -> tuple[dict[str, float], dict[str, Any]]:
    """({fqn: sparsity} of every layer ``cfg`` prunes, the allocation's record) — module
    docstring. ``cfg`` is a SparsityConfig with an unstructured ``sparsity``."""
    if cfg.sparsity is None or cfg.pattern not in (None, "unstructured"):
        raise SlimtorchError("allocation: rd spreads one unstructured sparsity over the layers; "
                             "give sparsity: S and no N:M pattern")
    layers, _ = targets(model, cfg)
    if not layers:
        raise SlimtorchError("allocation: rd found no layer to prune")
    flat = parse_pattern(0.5, None)
    with quant_state(model, weights=False, acts=False):
        delta = OutputDistortion(model, ctx.batches, cfg.rd_samples)
        curves = []
        for _, layer, _ in layers:
            w0 = layer.weight.detach().clone()
            score = w0.abs()
            curve = {}
            for pct in RD_GRID:
                if pct:
                    layer.weight.copy_(w0 * select(score, flat, pct / 100))
                curve[pct] = delta()
            layer.weight.copy_(w0)
            curves.append(curve)
    n = delta.n
    sizes = [layer.weight.numel() for _, layer, _ in layers]
    costs = [{pct: round(size * (100 - pct) / 100) for pct in RD_GRID} for size in sizes]
    budget = int((1 - cfg.sparsity) * sum(sizes))
    res = allocate(costs, curves, budget)
    ratios = {f: pct / 100 for (f, _, _), pct in zip(layers, res["bits"])}
    pruned = sum(s * r for s, r in zip(sizes, ratios.values())) / sum(sizes)
    return ratios, {"criterion": "rd", "samples": n, "grid_percent": list(RD_GRID),
                    "sparsity": round(pruned, 6), "distortion": res["value"],
                    "uniform_distortion": sum(_at_uniform(c, cfg.sparsity) for c in curves),
                    "exact": res["exact"],
                    "curves": {f: c for (f, _, _), c in zip(layers, curves)}}


def _at_uniform(curve: dict[int, float], sparsity: float) -> float:
    """δ at the grid point nearest the uniform sparsity (the baseline the DP improves on)."""
    return curve[min(curve, key=lambda p: abs(p / 100 - sparsity))]
