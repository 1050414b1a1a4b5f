"""Choose the units to remove: globally lowest-scored first, in steps, until the model's
MACs (or parameters) are at the target ratio, recounted after every step.

Each group is cut in *chunks*: with ``round_to = 8`` the first chunk is ``n mod 8`` units and
the others 8, so the group's channel count stays a multiple of 8 (what CPU GEMM/conv kernels
like); a group smaller than two chunks is cut one unit at a time. The next chunk of the group
whose next chunk has the lowest mean score goes first (a group's units are cut lowest first).
A chunk that would take the model more than ``tolerance`` below the target is skipped, and that
group is done; at most ``max_ratio`` of a group goes, and at least one unit stays.
"""
from __future__ import annotations

import heapq
import math

import torch
from torch import Tensor

from ..errors import PruningError
from .groups import Groups
from .surgery import cost_after, removed_counts


def chunks_of(units: list[int], scores: Tensor, round_to: int | None,
              max_ratio: float) -> list[list[int]]:
    """The group's units, lowest score first, cut into removal chunks."""
    order = sorted(units, key=lambda u: (float(scores[u]), u))
    n = len(order)
    limit = min(n - 1, math.floor(n * max_ratio))
    step = round_to if round_to and n >= 2 * round_to else 1
    sizes = ([n % step] if n % step else []) + [step] * (n // step)
    out, start = [], 0
    for s in sizes:
        if start + s > limit:
            break
        out.append(order[start:start + s])
        start += s
    return out


def select_units(groups: Groups, scores: Tensor, costs: dict, total_params: int,
                 metric: str, target: float, tolerance: float, round_to: int | None,
                 max_ratio: float, blocked: set[int]) -> tuple[set[int], dict]:
    """The units to remove so that ``metric`` (macs | params) is ``target`` × today's; and
    the record (ratio reached, steps). Raises when the target cannot be reached."""
    base = cost_after(costs, groups, {}, total_params)
    idx = 0 if metric == "macs" else 1
    removed: dict[tuple[str, str], int] = {}
    chunks = {g: chunks_of([u for u in us if u not in blocked], scores, round_to, max_ratio)
              for g, us in enumerate(groups.groups)}
    heap = [(_mean(scores, c[0]), g, 0)
            for g, c in chunks.items() if c]
    heapq.heapify(heap)
    pruned: set[int] = set()
    ratio, steps = 1.0, 0
    while heap and ratio > target:
        _, g, k = heapq.heappop(heap)
        trial = removed_counts(groups, chunks[g][k], removed)
        new = cost_after(costs, groups, trial, total_params)[idx] / base[idx]
        if new < target - tolerance:
            continue  # too coarse a cut here: this group is done
        removed, ratio, steps = trial, new, steps + 1
        pruned.update(chunks[g][k])
        if k + 1 < len(chunks[g]):
            heapq.heappush(heap, (_mean(scores, chunks[g][k + 1]), g, k + 1))
    if ratio > target + tolerance:
        raise PruningError(
            f"the pruning target {metric} {target:.3f} cannot be met: removing every unit the "
            f"groups allow leaves {ratio:.3f} of the {metric} ({len(blocked)} units pinned by "
            f"`keep`, {len(groups.excluded)} layer/reason pairs excluded, max_ratio "
            f"{max_ratio}); raise the target, unpin layers, or set round_to: null")
    return pruned, {"ratio": round(ratio, 4), "steps": steps, "units": len(pruned)}


def _mean(scores: Tensor, units: list[int]) -> float:
    return float(scores[torch.tensor(units)].mean())
