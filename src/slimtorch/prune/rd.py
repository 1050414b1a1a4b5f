"""Layer-adaptive structured pruning by the rate–distortion dynamic program (after Xu et al.,
"Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks",
ICCV 2023 — there per layer and per weight; here per dependency group and per channel chunk).

``allocation: rd`` replaces the global ranking of ``select`` by a joint choice of how much of
every group goes. For each group g and each candidate level k (the first k removal chunks of
the group, lowest-scored first by the criterion, the same chunks ``select`` cuts; at most
``rd_levels`` levels measured, spread evenly from 0 to the group's limit, linear interpolation
for the levels in between), that group alone is pruned — masked in the float model, which the
pruned model equals exactly — and the output distortion δ_g(k) = mean ‖f(x) − f_g,k(x)‖² is
measured on calibration inputs. With the distortions taken
as additive (the paper's finding), the choice

    min Σ_g δ_g(k_g)   subject to   Σ_g ΔC_g(k_g) ≥ (1 − t)·C

(ΔC_g(k): the MACs or parameters group g's level k removes alone; C the model's; t the kept
target) is a multiple-choice knapsack, solved exactly by the bit allocation's DP
(``quant.allocate.allocate``) in the kept-cost form. MACs are not additive across groups (a
conv between two pruned groups loses (1 − (1−a)(1−b)), less than a + b), so the real cost of
the joint choice is recounted and the DP's budget bisected until the real ratio is at the
target (within ``tolerance``, from below, as ``select`` stops); chunks are then given back one
at a time, the best δ gain per cost first, while the real ratio stays under the target.

Choices (the paper's code is not what we read): levels are chunks (multiples of ``round_to``)
rather than a ratio grid, so the kernels' channel rounding holds; δ of the model output
whatever its form (``eval.distortion``); at most ``rd_samples`` (256) calibration inputs.
Cost: one forward pass per group and level.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import PruningError
from ..eval.distortion import OutputDistortion
from ..quant.allocate import allocate
from .groups import Groups
from .select import chunks_of, select_units
from .surgery import cost_after, mask_model, removed_counts

MAX_STATES = 1 << 15  # DP resolution: the kept budget in ≤ 32k cost units
BISECT_STEPS = 18


def _levels(n_chunks: int, max_levels: int) -> list[int]:
    """0 … n_chunks, at most ``max_levels`` of them, evenly spread, both ends included."""
    if n_chunks + 1 <= max_levels:
        return list(range(n_chunks + 1))
    return sorted({round(i * n_chunks / (max_levels - 1)) for i in range(max_levels)})


def _interpolate(curve: dict[int, float], ks: list[int]) -> dict[int, float]:
    """δ at every level in ``ks``: measured where ``curve`` has it, linear in between."""
    pts = sorted(curve)
    out = {}
    for k in ks:
        hi = next(p for p in pts if p >= k)
        lo = max(p for p in pts if p <= k)
        out[k] = curve[lo] if hi == lo else (
            curve[lo] + (curve[hi] - curve[lo]) * (k - lo) / (hi - lo))
    return out


@torch.no_grad()
def _masked_delta(model, groups: Groups, units: list[int], delta: OutputDistortion) -> float:
    """δ of the model with ``units`` masked; the model is restored afterwards."""
    named = dict(model.named_modules())
    fqns = {f for u in units for f, role, _ in groups.units[u].where if role in ("out", "norm")}
    saved = {f: [(p, p.detach().clone()) for p in (named[f].weight, named[f].bias)
                 if p is not None] for f in fqns}
    try:
        mask_model(model, groups, set(units))
        return delta()
    finally:
        for pairs in saved.values():
            for p, v in pairs:
                p.copy_(v)


def _units_at(chunks: dict, gids: list[int], levels: list[int]) -> list[int]:
    """The units of the first ``levels[i]`` chunks of every group ``gids[i]``."""
    return [u for g, k in zip(gids, levels) for c in chunks[g][:k] for u in c]


def _fill(levels: list[int], chunks: dict, gids: list[int], values: list[dict], costs: dict,
          groups: Groups, total_params: int, idx: int, base: float, target: float):
    """Give chunks back while the real ratio stays at or under the target: each time the one
    whose return lowers the predicted δ most per unit of cost regained (the bisection lands
    below the target when the real cost jumps between budgets)."""
    def real_of(lv):
        units = _units_at(chunks, gids, lv)
        return units, cost_after(costs, groups, removed_counts(groups, units), total_params)[idx] / base
    units, real = real_of(levels)
    while True:
        best = None
        for i, k in enumerate(levels):
            if not k:
                continue
            trial = levels[:i] + [k - 1] + levels[i + 1:]
            t_units, t_real = real_of(trial)
            if t_real > target or t_real <= real:
                continue
            gain = (values[i][k] - values[i][k - 1]) / (t_real - real)
            if best is None or gain > best[0]:
                best = (gain, trial, t_units, t_real)
        if best is None:
            return levels, units, real
        _, levels, units, real = best


def rd_select(model, groups: Groups, scores: Tensor, costs: dict, total_params: int, cfg,
              ctx, blocked: set[int]) -> tuple[set[int], dict[str, Any]]:
    """The units to remove (module docstring) and the record: per-group levels (units removed
    of the group's), every group's curve {units removed: δ}, the predicted (Σ δ) and measured
    distortion of the choice, and the measured distortion of the global ranking's choice."""
    metric, target, tol = cfg.target.metric, cfg.target.ratio, cfg.tolerance
    idx = 0 if metric == "macs" else 1
    base = cost_after(costs, groups, {}, total_params)[idx]
    chunks = {g: chunks_of([u for u in us if u not in blocked], scores, cfg.round_to,
                           cfg.max_ratio) for g, us in enumerate(groups.groups)}
    chunks = {g: c for g, c in chunks.items() if c}
    if not chunks:
        raise PruningError("allocation: rd found no group with a removable chunk (every unit "
                           "pinned or groups too small); unpin layers or set round_to: null")
    delta = OutputDistortion(model, ctx.batches, cfg.rd_samples)
    gids, reduction, curves, values = list(chunks), [], [], []
    for g in gids:
        ks = list(range(len(chunks[g]) + 1))
        units_at = [_units_at(chunks, [g], [k]) for k in ks]
        reduction.append({k: base - cost_after(costs, groups, removed_counts(groups, units_at[k]),
                                               total_params)[idx] for k in ks})
        curve = {k: _masked_delta(model, groups, units_at[k], delta) if k else 0.0
                 for k in _levels(len(chunks[g]), cfg.rd_levels)}
        curves.append(curve)
        values.append(_interpolate(curve, ks))
    most = [max(r.values()) for r in reduction]
    kept_costs = [{k: int(round(m - r[k])) for k in r} for m, r in zip(most, reduction)]
    floor = base - sum(most)  # predicted kept cost with every group at its limit

    def solve(budget: int) -> tuple[list[int], list[int], float]:
        res = allocate(kept_costs, values, budget, max_states=MAX_STATES)
        units = _units_at(chunks, gids, res["bits"])
        real = cost_after(costs, groups, removed_counts(groups, units), total_params)[idx] / base
        return res["bits"], units, real

    hi = int(target * base - floor)
    if hi < 0 or floor / base > target + tol:
        raise PruningError(
            f"the pruning target {metric} {target:.3f} cannot be met: removing every unit the "
            f"groups allow leaves about {max(floor, 0) / base:.3f} of the {metric}; raise the "
            "target, unpin layers, or set round_to: null")
    best = solve(hi)
    if best[2] > target:  # joint removal counts less than the sum: tighten the budget
        lo, best = 0, solve(0)
        for _ in range(BISECT_STEPS):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            cand = solve(mid)
            if cand[2] <= target:
                lo, best = mid, cand
            else:
                hi = mid
    levels, units, real = _fill(list(best[0]), chunks, gids, values, costs, groups,
                                total_params, idx, base, target)
    if real > target + tol:
        raise PruningError(
            f"the pruning target {metric} {target:.3f} cannot be met: removing every unit the "
            f"groups allow leaves {real:.3f} of the {metric}; raise the target, unpin layers, "
            "or set round_to: null")
    if real < target - tol:
        raise PruningError(f"allocation: rd reached {metric} {real:.3f} for the target "
                           f"{target:.3f} (tolerance {tol}): chunks too coarse here; set "
                           "round_to: 4 or null, or raise the tolerance")
    pruned = set(units)
    measured = _masked_delta(model, groups, units, delta)
    greedy, _ = select_units(groups, scores, costs, total_params, metric, target, tol,
                             cfg.round_to, cfg.max_ratio, blocked)
    record = {"allocation": "rd", "samples": delta.n, "forward_passes":
              sum(len(c) - 1 for c in curves),
              "distortion_predicted": sum(v[k] for v, k in zip(values, levels)),
              "distortion_measured": measured,
              "global_ranking_distortion": _masked_delta(model, groups, sorted(greedy), delta),
              "levels": {str(g): {"removed": sum(len(c) for c in chunks[g][:k]),
                                  "of": len(groups.groups[g])}
                         for g, k in zip(gids, levels)},
              "curves": {str(g): {str(sum(len(c) for c in chunks[g][:k])): d
                                  for k, d in curve.items()} for g, curve in zip(gids, curves)},
              "ratio": round(real, 4), "units": len(pruned)}
    return pruned, record
