"""What reconstruction learns, held by the method while it runs — never by the core quantizer.

* ``AdaRound`` (Nagel et al., ICML 2020): per weight element a V with soft rounding
  h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1), ζ = 1.1, γ = −0.1;
  W̃ = s·(clip(⌊W/s⌋ + h(V) + z, q_min, q_max) − z); regulariser Σ(1 − |2h(V) − 1|^β).
  Hard rounding h = 1[V ≥ 0] once the unit is done; ``commit`` writes W̃ into the weight so that
  round-to-nearest of it gives exactly the learned codes (``freeze`` and the artifact format do
  not know AdaRound).
* ``LSQ`` (Esser et al., ICLR 2020): the activation step size s as a parameter, its gradient
  scaled by 1/√(N·q_max); ``finish`` writes |s| back into the quantizer.

A quantizer runs a learner through its one slot, ``Quantizer.learner``: while set, the
learner computes the fake-quantized value from the quantizer's grid (scale, zero point, integer
range). Attaching and detaching is all the quantizer knows of either method.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..quant.quantizer import Quantizer, fake_quant, grad_scale

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rectified_sigmoid_inverse(frac: Tensor) -> Tensor:
    """V with h(V) = frac for frac in [0, 1): V = −log((ζ−γ)/(frac−γ) − 1)."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


class AdaRound:
    """Learned rounding of one weight quantizer (module docstring)."""

    def __init__(self, q: Quantizer, w: Tensor, v: Tensor | None = None, hard: bool = False):
        """Start at h(V) = frac(W/s), i.e. the float weight inside the grid (or at a saved V)."""
        self.q = q
        if v is None:
            x = q.layout(w.detach()) / q.scale
            v = rectified_sigmoid_inverse(x - torch.floor(x))
        self.v = nn.Parameter(v)
        self.hard = hard
        q.learner = self

    def start(self, gen: torch.Generator, iters: int) -> None:
        """Before the first step: the run's generator and length (for schedules; unused)."""

    def at_step(self, t: int) -> None:
        """Before step ``t``: move a schedule on (AdaRound has none; β is the runner's)."""

    def h(self) -> Tensor:
        return (self.v >= 0).float() if self.hard else rectified_sigmoid(self.v)

    def __call__(self, q: Quantizer, g: Tensor) -> Tensor:
        """W̃ on the quantizer's layout ``g`` of the weight."""
        codes = torch.clamp(torch.floor(g / q.scale) + self.h() + q.zero_point, q.qmin, q.qmax)
        return (codes - q.zero_point) * q.scale

    def regularizer(self, beta: float) -> Tensor:
        """Σ (1 − |2h(V) − 1|^β): pushes every h(V) to 0 or 1."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def commit(self, w: Tensor) -> Tensor:
        """Hard-round, detach from the quantizer, return the dequantized weight (whose
        round-to-nearest codes are the AdaRound codes)."""
        self.hard = True
        out = self(self.q, self.q.layout(w)).reshape(w.shape)
        self.q.learner = None
        return out


class LSQ:
    """A learned step size for one activation quantizer (module docstring)."""

    def __init__(self, q: Quantizer):
        self.q = q
        self.scale = nn.Parameter(q.scale.detach().clone())
        q.learner = self

    def __call__(self, q: Quantizer, g: Tensor) -> Tensor:
        s = grad_scale(self.scale, 1.0 / math.sqrt(g.numel() * q.qmax))
        return fake_quant(g, s, q.zero_point, q.qmin, q.qmax)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the learned |s| into the quantizer and detach."""
        self.q.scale = self.scale.detach().abs().clamp(min=1e-8).clone()
        self.q.learner = None


def adaround_of(q: Quantizer | None) -> AdaRound | None:
    learner = getattr(q, "learner", None)
    return learner if isinstance(learner, AdaRound) else None
