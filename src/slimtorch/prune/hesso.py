"""HESSO: progressive structured pruning while training (Chen et al., "HESSO: Towards Automatic
Efficient and User Friendly Any Neural Network Training and Pruning", 2024; the optimizer of
only-train-once), on our dependency groups, with distillation from the float model as the
training loss (``recover``'s loop and settings).

The training budget (``epochs`` or ``steps``) is cut into: ``start`` (plain training), then
``periods`` pruning periods of D steps ending at ``prune_until`` of the budget, then plain
training of what is left with the pruned channels held at zero. At the first step of period p
(0-based, of P) HESSO's saliency (``criteria.saliency``: five globally normalised terms of the
weights and the current gradient) is computed for every unit, and the lowest-scored units are
chosen, in addition to those already pruned, until the model is at 1 − (1 − R)·(p + 1)/P of
the MACs (or params) — the same ``select`` the ``prune`` method uses, so rounding to 8,
``max_ratio`` and ``keep`` hold alike, and the last period ends at the target R. Those
*active redundant* units train with the rest, and after every optimizer step their producer
rows, biases and BatchNorm affine are multiplied by (D − t − 1)/(D − t) at step t = 0 … D − 1
of the period, so they reach exactly zero at its last step; from then on they are pruned and
set back to zero after every step. At the end the pruned units are removed physically; the
zeroed model and the removed one agree exactly (checked on the first calibration batch and
recorded; a mismatch is an error, never a silently different model).

Where this differs from the public code: they choose a number of groups per period (bottom-K
of the scores, K split evenly over periods); we choose units until a MACs (params) ratio, as
every pruning method here targets MACs. Their first period runs t = 1 … D − 1 (the step
counter is advanced before the test), ours t = 0 … D − 1 in every period. Not built: HESSO's
weight decay on redundant groups and OTO's half-space projection (DHSPG).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..errors import PruningError
from ..eval.distortion import flat_output
from ..graph.capture import call_model
from ..methods import MethodContext, register_method
from . import criteria
from .method import Plan, SelectionConfig
from .recover import RecoverConfig, budget, distil
from .surgery import scale_units, unit_positions

Term = Literal["magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order",
               "taylor_second_order"]


class HessoConfig(RecoverConfig, SelectionConfig):
    structural: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    shrinks: ClassVar[bool] = True
    periods: int = Field(10, ge=1, description="pruning periods (each one projects its share "
                         "of the units to zero)")
    start: float = Field(0.0, ge=0, lt=1, description="fraction of the budget trained before "
                         "the first period")
    prune_until: float = Field(0.5, gt=0, le=1, description="fraction of the budget at which "
                               "the last period ends; the rest trains the pruned model")
    weights: dict[Term, float] = Field(
        default_factory=lambda: dict.fromkeys(criteria.HESSO_TERMS, 0.2),
        description="saliency: weight of each normalised term (HESSO's default 0.2 each)")

    @model_validator(mode="after")
    def _span(self):
        if self.prune_until <= self.start:
            raise ValueError(f"prune_until ({self.prune_until}) must be after start "
                             f"({self.start})")
        if not any(self.weights.values()):
            raise ValueError("weights: give at least one saliency term a non-zero weight")
        return self


def factor(t: int, d: int) -> float:
    """The projection at step t of a D-step period: (D − t − 1)/(D − t); 0 at t = D − 1, and
    the product over t = 0 … s is (D − s − 1)/D (a linear ramp to zero)."""
    return (d - t - 1.0) / (d - t)


class Schedule:
    """The pruning periods of a training run and the state they carry (module docstring)."""

    def __init__(self, model, plan: Plan, cfg: HessoConfig, total: int):
        s0, s1 = round(cfg.start * total), round(cfg.prune_until * total)
        self.d = (s1 - s0) // cfg.periods
        if self.d < 1:
            raise PruningError(
                f"hesso: {cfg.periods} pruning periods do not fit in {s1 - s0} steps (of "
                f"{total}; start {cfg.start}, prune_until {cfg.prune_until}); give more "
                "epochs/steps or fewer periods")
        self.model, self.plan, self.cfg, self.s0 = model, plan, cfg, s0
        self.pruned: set[int] = set()
        self.active: set[int] = set()
        self.at_active: dict = {}
        self.at_pruned: dict = {}
        self.log: list[dict[str, Any]] = []
        self.selection: dict = {}

    def where(self, step: int) -> tuple[int, int] | None:
        """(period, t) of a step inside the pruning span, else None."""
        k = step - self.s0
        if k < 0 or k >= self.d * self.cfg.periods:
            return None
        return divmod(k, self.d)

    def before_step(self, step: int) -> None:  # gradients of this step are in .grad
        at = self.where(step)
        if at is None or at[1] != 0:
            return
        p, target = at[0], self.cfg.target.ratio
        scores = criteria.saliency(self.model, self.plan.groups, self.cfg.weights)
        ratio = 1 - (1 - target) * (p + 1) / self.cfg.periods
        chosen, self.selection = self.plan.select(scores, ratio, forced=self.pruned)
        self.active = chosen - self.pruned
        self.at_active = unit_positions(self.plan.groups, self.active)
        self.log.append({"period": p, "step": step + 1, "ratio": self.selection["ratio"],
                         "units": len(self.active)})

    def after_step(self, step: int) -> None:
        at = self.where(step)
        if at is not None and self.active:
            scale_units(self.model, self.at_active, factor(at[1], self.d))
            if at[1] == self.d - 1:  # the period's units are exactly zero: pruned
                self.pruned |= self.active
                self.active, self.at_active = set(), {}
                self.at_pruned = unit_positions(self.plan.groups, self.pruned)
        scale_units(self.model, self.at_pruned, 0.0)


@torch.no_grad()
def _eval_out(model, item) -> torch.Tensor:
    was = model.training
    model.eval()
    out = call_model(model, item)
    model.train(was)
    return flat_output(out).detach()


@register_method("hesso", HessoConfig)
def apply(model, cfg: HessoConfig, ctx: MethodContext) -> dict[str, Any]:
    plan = Plan(model, cfg, ctx)
    # a target no unit set meets is an error now, not after training
    plan.select(criteria.magnitude(model, plan.groups, 2))
    sched = Schedule(model, plan, cfg, budget(cfg, ctx)[3])
    training = distil(model, cfg, ctx, "hesso (KD)", sched.before_step, sched.after_step)
    if sched.active:  # cannot happen with the span inside the budget; never ship it silently
        raise PruningError("hesso: a pruning period did not finish inside the budget")
    zeroed = _eval_out(model, plan.example)
    record = plan.remove(model, sched.pruned, criterion="hesso", selection=sched.selection)
    diff = float((_eval_out(model, plan.example) - zeroed).abs().max())
    scale = float(zeroed.abs().max()) + 1e-6
    if diff > 1e-3 * scale:
        raise PruningError(f"hesso: the model with the pruned channels removed differs from "
                           f"the trained one with them at zero (max |Δ| {diff:.3g} of "
                           f"{scale:.3g}); a channel rule is wrong for this model: report it, "
                           "and pin the layers involved with keep: [...]")
    record["hesso"] = {"periods": sched.log, "period_steps": sched.d,
                       "start_step": sched.s0, "removal_max_abs_diff": diff}
    record["training"] = training
    return record
