"""The ``prune`` method: structured pruning to a MACs or parameter target, on the registry.

``{name: prune, criterion: taylor, target: {macs: 0.5}}`` keeps 50 % of the Conv/Linear MACs
(±``tolerance``): capture the float model's graph on the first calibration batch, derive the
dependency groups (``groups``), score every unit (``criteria``), remove the globally lowest in
steps until the target is met (``select``; or, with ``allocation: rd``, how much of each group
goes by the rate-distortion DP, ``rd``), then shrink the modules (``surgery``). It runs
before quantization, on the float model (``structural``); the returned ``history`` is what
``slimtorch.load`` replays on the base model.
"""
from __future__ import annotations

import math
import re
import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PruningError
from ..graph.capture import call_model, capture
from ..methods import MethodConfig, MethodContext, register_method
from . import criteria
from .groups import Groups, dependency_groups
from .rd import rd_select
from .select import select_units
from .surgery import count_macs, kept_indices, layer_costs, shrink


class Target(BaseModel):
    """The fraction of the model's MACs or parameters to keep (one of the two)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    macs: float | None = Field(None, gt=0, lt=1, description="kept fraction of MACs")
    params: float | None = Field(None, gt=0, lt=1, description="kept fraction of parameters")

    @model_validator(mode="after")
    def _one(self):
        if (self.macs is None) == (self.params is None):
            raise ValueError("give one of macs or params, e.g. target: {macs: 0.5}")
        return self

    @property
    def metric(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def ratio(self) -> float:
        return self.macs if self.macs is not None else self.params


class SelectionConfig(MethodConfig):
    """What every channel-pruning method shares: the target and how units may go."""
    target: Target = Field(default_factory=lambda: Target(macs=0.5),
                           description="kept fraction of MACs or params")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="allowed distance to the target")
    round_to: int | None = Field(8, ge=2, description="keep channel counts multiples of this "
                                 "where the group allows (None: any count)")
    max_ratio: float = Field(0.9, gt=0, le=1, description="at most this fraction of a group")
    keep: list[str] = Field(default_factory=list, description="layers never pruned "
                            "(fqn or re:regex); a unit touching one stays")


class PruneConfig(SelectionConfig):
    structural: ClassVar[bool] = True
    shrinks: ClassVar[bool] = True
    criterion: Literal["magnitude", "taylor", "random"] = Field(
        "magnitude", description="unit importance (see prune.criteria)")
    p: Literal[1, 2] = Field(2, description="magnitude: L1 or L2 over the unit's weights")
    normalize: Literal["mean"] | None = Field(
        "mean", description="divide scores by their group's mean (Torch-Pruning's default)")
    allocation: Literal["global", "rd"] = Field(
        "global", description="global: remove the globally lowest-scored chunks (select); rd: "
        "how much of each group goes by the rate-distortion DP over measured output "
        "distortions (prune/rd.py), under the same target")
    rd_samples: int = Field(256, ge=1, description="rd: calibration inputs it measures on")
    rd_levels: int = Field(20, ge=2, description="rd: candidate levels per group")
    taylor_batches: int | None = Field(None, ge=1, description="calibration batches for "
                                       "Taylor gradients (None: all)")


def pinned_units(groups: Groups, names: list[str], keep: list[str]) -> set[int]:
    """Units touching a layer ``keep`` names; a pattern naming no module is an error."""
    hits = {}
    for pat in keep:
        rx = re.compile(pat[3:]) if pat.startswith("re:") else None
        hits[pat] = {n for n in names if (rx.fullmatch(n) if rx else n == pat)}
        if not hits[pat]:
            raise PruningError(f"keep: {pat!r} names no module of the model (give a module "
                               "name, e.g. 'layer1.0.conv1', or 're:layer1\\..*')")
    pinned_layers = set().union(*hits.values()) if hits else set()
    return {u.uid for u in groups.units if any(f in pinned_layers for f, _, _ in u.where)}


def scores_for(model, groups: Groups, cfg: PruneConfig, ctx: MethodContext) -> torch.Tensor:
    if cfg.criterion == "random":
        return criteria.random_scores(groups, ctx.seed)
    if cfg.criterion == "taylor":
        s = criteria.taylor(model, groups, ctx.batches[:cfg.taylor_batches])
    else:
        s = criteria.magnitude(model, groups, cfg.p)
    return criteria.normalize_mean(s, groups) if cfg.normalize == "mean" else s


class Plan:
    """The float model's graph on the first calibration batch, its dependency groups, and
    what selection needs: unit costs, pinned units, the model's size before pruning."""

    def __init__(self, model, cfg: SelectionConfig, ctx: MethodContext):
        self.t0 = time.perf_counter()
        self.example = ctx.batches[0]
        graph = capture(model, self.example)
        self.groups = dependency_groups(model, graph)
        if not self.groups.units:
            raise PruningError("no channel of this model can be pruned safely: " + "; ".join(
                f"{e['layer']}: {e['why']}" for e in self.groups.excluded[:5]))
        self.names = [n for n, _ in model.named_modules()]
        self.blocked = pinned_units(self.groups, self.names, cfg.keep)
        self.total = sum(p.numel() for p in model.parameters())
        self.costs = layer_costs(model, graph)
        self.macs0 = count_macs(model, graph)
        self.cfg = cfg

    def select(self, scores: torch.Tensor, ratio: float | None = None,
               forced: set[int] = frozenset()) -> tuple[set[int], dict]:
        """``select_units`` to ``ratio`` (default: the target) by ``scores``; the units in
        ``forced`` go first (HESSO's already-pruned groups)."""
        if forced:
            scores = scores.clone()
            scores[torch.tensor(sorted(forced))] = -math.inf
        c = self.cfg
        return select_units(self.groups, scores, self.costs, self.total, c.target.metric,
                            c.target.ratio if ratio is None else ratio, c.tolerance,
                            c.round_to, c.max_ratio, self.blocked)

    def remove(self, model, pruned: set[int], **record) -> dict[str, Any]:
        """Shrink ``model`` in place by the units ``pruned``; the method's record (history,
        MACs and params before/after, kept channels per layer, ``record``'s entries)."""
        groups = self.groups
        modules = kept_indices(groups, pruned)
        shrink(model, modules)
        try:
            with torch.no_grad():
                call_model(model, self.example)
            macs1 = count_macs(model, capture(model, self.example))
        except RuntimeError as e:
            raise PruningError(f"the pruned model does not run ({str(e).splitlines()[0]}): an "
                               "op the channel rules passed through depends on a fixed channel "
                               "count; pin the layers around it with keep: [...]") from None
        params1 = sum(p.numel() for p in model.parameters())
        by_group = {}
        for u in pruned:
            by_group.setdefault(groups.units[u].group, []).append(u)
        # output channels of every prunable layer, before and after: the report's chart
        outs = {fqn: n for (fqn, role), n in groups.sizes.items() if role == "out"}
        channels = {fqn: [outs[fqn], len(modules.get(fqn, {}).get("out", range(outs[fqn])))]
                    for fqn in self.names if fqn in outs}  # in model order
        history = {"modules": modules,
                   "groups": [{"group": g, "layers": groups.group_layers(g),
                               "removed": len(us), "of": len(groups.groups[g])}
                              for g, us in sorted(by_group.items())]}
        return {"history": history, **record, "target": self.cfg.target.model_dump(),
                "macs": {"before": self.macs0, "after": macs1,
                         "ratio": round(macs1 / self.macs0, 4)},
                "params": {"before": self.total, "after": params1,
                           "ratio": round(params1 / self.total, 4)},
                "channels": channels, "groups": len(groups.groups), "units": len(groups.units),
                "excluded": groups.excluded, "seconds": round(time.perf_counter() - self.t0, 2)}


def prune_model(model, cfg: PruneConfig, ctx: MethodContext) -> dict[str, Any]:
    """Prune ``model`` in place to ``cfg.target``; returns the record with the history."""
    plan = Plan(model, cfg, ctx)
    scores = scores_for(model, plan.groups, cfg, ctx)
    if cfg.allocation == "rd":
        pruned, sel = rd_select(model, plan.groups, scores, plan.costs, plan.total, cfg, ctx,
                                plan.blocked)
    else:
        pruned, sel = plan.select(scores)
    return plan.remove(model, pruned, criterion=cfg.criterion, selection=sel)


@register_method("prune", PruneConfig)
def apply(model, cfg: PruneConfig, ctx: MethodContext) -> dict[str, Any]:
    return prune_model(model, cfg, ctx)
