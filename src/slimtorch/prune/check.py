"""Structural pruning check on any model: remove a fraction of every dependency group's units
(lowest group-L2 magnitude first), and compare the physically smaller model with the masked
float model (the removed channels zeroed), which it must equal up to float reordering.

``bench/prune_coverage.py`` runs it on every architecture of the coverage suite and
``tests/test_prune_coverage.py`` on the fast ones: a concat/split/chunk/attention rule that
lets a group shrink where the code cannot follow breaks the pruned model's shapes or its output.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..eval.distortion import flat_output
from ..graph.capture import call_model, capture
from . import criteria
from .groups import Groups, dependency_groups
from .surgery import count_macs, kept_indices, mask_model, shrink


@dataclass
class PruneCheck:
    model: nn.Module                 # the float model
    groups: Groups
    pruned_units: set[int]
    small: nn.Module                 # physically pruned copy
    masked: nn.Module                # float copy with the removed channels zeroed
    stats: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def prune_each_group(model: nn.Module, example: Any, fraction: float = 0.3) -> PruneCheck:
    """Remove ⌊fraction·n⌋ of the n units of every group (groups of fewer than 2 units stay),
    lowest magnitude first; returns both copies and the counts (channels, params, MACs)."""
    model = model.eval()
    graph = capture(model, example)
    groups = dependency_groups(model, graph)
    scores = criteria.magnitude(model, groups, 2)
    pruned: set[int] = set()
    for units in groups.groups:
        k = math.floor(fraction * len(units))
        if len(units) >= 2 and k:
            pruned.update(sorted(units, key=lambda u: (float(scores[u]), u))[:k])
    small = copy.deepcopy(model)
    shrink(small, kept_indices(groups, pruned))
    masked = mask_model(copy.deepcopy(model), groups, pruned)
    params = sum(p.numel() for p in model.parameters())
    layers = {f for u in groups.units for f, r, _ in u.where if r == "out"}
    stats = {"groups": len(groups.groups), "units": len(groups.units),
             "removed_units": len(pruned), "pruned_layers": len(layers),
             "params_ratio": sum(p.numel() for p in small.parameters()) / params,
             "macs_before": count_macs(model, graph),
             "excluded": groups.excluded}
    return PruneCheck(model, groups, pruned, small, masked, stats)


def flat(out: Any) -> Tensor:
    return flat_output(out).double()


@torch.no_grad()
def compare(check: PruneCheck, item: Any) -> dict[str, Any]:
    """Run both copies on ``item``: MACs ratio, output shape, max |small − masked| relative
    to the output's scale (``rel_err``), and the same for masked against float (``rel_change``:
    the pruning did change the output, so the check is not vacuous)."""
    a = flat(call_model(check.small, item))
    b = flat(call_model(check.masked, item))
    f = flat(call_model(check.model, item))
    out = {"shape_ok": a.shape == b.shape}
    scale = b.abs().max().clamp_min(1e-12)
    if out["shape_ok"]:
        out["rel_err"] = float((a - b).abs().max() / scale)
    out["rel_change"] = float((b - f).abs().max() / scale)
    out["macs_ratio"] = (count_macs(check.small, capture(check.small, item))
                         / check.stats["macs_before"])
    return out
