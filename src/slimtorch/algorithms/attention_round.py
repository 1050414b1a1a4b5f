"""Attention Round (Diao et al. 2022, arXiv 2207.03088): during reconstruction each weight may
be mapped to *any* grid level, with a probability that decays as a Gaussian in its distance.

Per weight a latent grid coordinate u (initialised at W/s, learned; the grid point is u + z).
Each training step samples the level k of every weight from

    P(k) ∝ exp(−(k − (u + z))² / (2τ²)),   k ∈ {q_min, …, q_max}

and the forward uses W̃ = s·(k − z); the gradient reaches u straight through (∂W̃/∂u = s). As τ
shrinks the distribution concentrates on the nearest level; at the end the rounding is
k = clip(⌊u + z⌉) (the mode), written into the weight like AdaRound's.

What the paper leaves open (or what we could not read of it), and our choice:
* τ schedule: linear decay from ``tau`` = 0.5 grid steps to 0 over the first ``decay`` = 80 %
  of the steps, then deterministic rounding (straight-through) for the rest;
* the sampled support: levels within ±⌈5τ⌉ of ⌊u + z⌉ (outside it the Gaussian weight is below
  e^(−12.5) ≈ 4·10⁻⁶ of the nearest level's), drawn by the Gumbel-max trick from the run's
  seeded generator;
* loss and units: the reconstruction runner's ‖unit(x_q) − unit_fp(x_fp)‖² per residual block
  (BRECQ's units; ``units: layer`` for AdaRound's), activation quantization off during the
  weight search (its calibrated ranges kept), Adam on u with AdaRound's ``lr: auto`` rule, no
  rounding regulariser (the shrinking τ plays its part).
The coding-length bit allocation of the same paper is ``quant.allocate.coding_length`` and the
recipe option ``mixed: {criterion: coding_length, avg_bits: 4}``.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from ..methods import MethodConfig, MethodContext, register_method
from ..quant.quantizer import Quantizer
from ..runner import recon
from ..runner.learned import AdaRound
from ..runner.recon import Stage
from .adaround import V_LR_CAP, V_TRAVEL, layer_units
from .brecq import block_units

WINDOW_SIGMAS = 5.0


def gaussian_level_probs(u: Tensor, levels: Tensor, tau: float) -> Tensor:
    """P(k) ∝ exp(−(k − u)²/(2τ²)) over ``levels`` for each u: shape [*u.shape, len(levels)]."""
    logits = -(levels - u.unsqueeze(-1)).square() / (2 * tau * tau)
    return torch.softmax(logits, dim=-1)


class AttentionRound(AdaRound):
    """The learner on one weight quantizer (module docstring); ``v`` holds u."""

    def __init__(self, q: Quantizer, w: Tensor, v: Tensor | None = None, hard: bool = False,
                 tau: float = 0.5, decay: float = 0.8):
        self.q = q
        if v is None:
            v = q.layout(w.detach()) / q.scale  # u = W/s: the grid coordinate without z
        self.v = nn.Parameter(v)
        self.hard, self.tau0, self.decay = hard, tau, decay
        self.tau, self.iters, self.gen = 0.0, 1, None
        q.learner = self

    def start(self, gen: torch.Generator, iters: int) -> None:
        self.gen, self.iters, self.tau = gen, max(1, iters), self.tau0

    def at_step(self, t: int) -> None:
        self.tau = self.tau0 * max(0.0, 1.0 - t / max(1.0, self.decay * self.iters))

    def sample(self, u: Tensor, q: Quantizer) -> Tensor:
        """Levels drawn from the Gaussian-decay distribution around u (grid units, with z)."""
        j = math.ceil(WINDOW_SIGMAS * self.tau)
        offsets = torch.arange(-j, j + 1, dtype=u.dtype)                  # [2j+1]
        levels = torch.round(u).unsqueeze(-1) + offsets                   # [*u, 2j+1]
        logits = -(levels - u.unsqueeze(-1)).square() / (2 * self.tau ** 2)
        logits = logits.masked_fill((levels < q.qmin) | (levels > q.qmax), -math.inf)
        gumbel = -torch.log(-torch.log(
            torch.rand(logits.shape, generator=self.gen, dtype=u.dtype).clamp_(1e-20, 1.0)))
        pick = (logits + gumbel).argmax(-1, keepdim=True)
        return levels.gather(-1, pick).squeeze(-1)

    def __call__(self, q: Quantizer, g: Tensor) -> Tensor:
        u = torch.clamp(self.v + q.zero_point, q.qmin, q.qmax)
        stochastic = (not self.hard and self.tau > 0 and self.gen is not None
                      and torch.is_grad_enabled())
        with torch.no_grad():
            k = self.sample(u, q) if stochastic else torch.round(u)
        codes = (k - u).detach() + u  # straight through to u
        return (codes - q.zero_point) * q.scale

    def regularizer(self, beta: float) -> Tensor:
        return torch.zeros(())


class AttentionRoundConfig(MethodConfig):
    iters: int = Field(200, ge=0, description="optimisation steps per unit")
    batch_size: int = Field(32, ge=1)
    lr: PositiveFloat | Literal["auto"] = Field(
        "auto", description="Adam lr of u (grid steps); auto: max(1e-3, min(2/iters, 1e-2))")
    tau: float = Field(0.5, gt=0, description="initial σ of the Gaussian, in grid steps")
    decay: float = Field(0.8, gt=0, le=1, description="fraction of the steps over which "
                         "σ decays linearly to 0")
    units: Literal["block", "layer"] = "block"
    cache_mb: int = Field(2048, ge=1)

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        return {"lr": self.round_lr()} if self.lr == "auto" else {}

    def round_lr(self) -> float:
        if self.lr != "auto":
            return self.lr
        return max(1e-3, min(V_LR_CAP, V_TRAVEL / max(1, self.iters)))

    def stage(self) -> Stage:
        tau, decay = self.tau, self.decay

        class Rounding(AttentionRound):  # this config's schedule
            def __init__(self, q, w, v=None, hard=False):
                super().__init__(q, w, v, hard, tau=tau, decay=decay)
        return Stage("weights", self.iters, learn_weights=True, learn_acts=False,
                     acts_on=False, batch_size=self.batch_size, lr_round=self.round_lr(),
                     round_weight=0.0, rounding=Rounding)


@register_method("attention_round", AttentionRoundConfig)
def apply(model, cfg: AttentionRoundConfig, ctx: MethodContext) -> dict[str, Any]:
    units_fn = block_units if cfg.units == "block" else layer_units
    return recon.run_stages(model, ctx, [cfg.stage()], units_fn=units_fn,
                            cache_mb=cfg.cache_mb)
