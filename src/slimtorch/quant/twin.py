"""Twin-uniform quantizer (PTQ4ViT, Yuan et al. 2022): two uniform ranges, each with k−1 bits.

With n = 2^(k−1) − 1 levels per range, a split point t and two steps Δ_lo, Δ_hi:

    Δ(x) = Δ_lo if x < t else Δ_hi,      x̂ = Δ(x) · clip(⌊x/Δ(x)⌉, −n, n)

* post-softmax (values in [0, 1]): t = 2^−i searched over i = 0…19, Δ_lo = t/n (the small
  probabilities get a fine grid up to t), Δ_hi = 1/n (the large ones a coarse grid up to 1);
* post-GELU (signed): t = 0, negatives on their own grid Δ_lo = |min|/n (GELU ≥ −0.17) and the
  positives on Δ_hi found by an MSE clip search.

Which form a quantizer takes is decided from what it observed (all values in [0, 1] → the
power-of-two split; otherwise the sign split). The search criterion at initialisation is the
mean squared error; PTQ4ViT's Hessian-guided search (``algorithms/ptq4vit.py``) refines it.
State lives in the buffers ``scale`` (Δ_lo), ``scale_high`` (Δ_hi) and ``split`` (t).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .log2 import SampledQuantizer
from .quantizer import Mode, round_ste

SPLITS = tuple(2.0 ** -i for i in range(20))


def twin_quant(x: Tensor, lo_step: Tensor, hi_step: Tensor, split: Tensor, n: int,
               ste: bool = True) -> Tensor:
    step = torch.where(x < split, lo_step, hi_step)
    r = round_ste(x / step) if ste else torch.round(x / step)
    return torch.clamp(r, -n, n) * step


class TwinUniformQuantizer(SampledQuantizer):
    """Per-tensor twin-uniform quantizer (spec kind ``twin_uniform``)."""

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.levels = 2 ** (spec.bits - 1) - 1
        self.register_buffer("scale_high", torch.ones(()))
        self.register_buffer("split", torch.zeros(()))

    @property
    def softmax_form(self) -> bool:
        return bool(self.split > 0)

    def fake_quant(self, x: Tensor) -> Tensor:
        return twin_quant(x, self.scale, self.scale_high, self.split, self.levels)

    def error(self, x: Tensor, lo_step, hi_step, split) -> float:
        xq = twin_quant(x, lo_step, hi_step, split, self.levels, ste=False)
        return (xq - x).square().mean().item()

    @torch.no_grad()
    def finish_observe(self) -> None:
        x = self._sample()
        n = self.levels
        if x.min() >= 0 and x.max() <= 1 + 1e-6:  # probabilities: power-of-two split
            hi = torch.tensor(1.0 / n)
            best = min(SPLITS, key=lambda t: self.error(x, torch.tensor(t / n), hi,
                                                         torch.tensor(t)))
            self.set_twin(best / n, 1.0 / n, best)
        else:  # signed: negatives and positives on separate grids
            neg = max(-x.min().item(), 1e-8) / n
            pos_max = max(x.max().item(), 1e-8)
            cands = [pos_max * k / 100 / n for k in range(1, 101)]
            hi = min(cands, key=lambda s: self.error(x, torch.tensor(neg), torch.tensor(s),
                                                     torch.zeros(())))
            self.set_twin(neg, hi, 0.0)
        self.mode = Mode.QUANT

    def set_twin(self, lo_step: float, hi_step: float, split: float) -> None:
        self.scale = torch.tensor(float(lo_step))
        self.scale_high = torch.tensor(float(hi_step))
        self.split = torch.tensor(float(split))
        self.zero_point = torch.zeros(())

    def quantize_int(self, x: Tensor) -> Tensor:
        """Codes in [−n, n] plus the range bit as ±(n+1) offset: high range → code + 2n+1."""
        high = x >= self.split
        step = torch.where(high, self.scale_high, self.scale)
        q = torch.clamp(torch.round(x / step), -self.levels, self.levels)
        return torch.where(high, q + 2 * self.levels + 1, q).to(torch.int16)

    def dequantize_int(self, q: Tensor) -> Tensor:
        q = q.float()
        high = q > self.levels
        return torch.where(high, (q - 2 * self.levels - 1) * self.scale_high, q * self.scale)

    def extra_repr(self) -> str:
        return (f"twin_uniform, bits={self.spec.bits}, split={float(self.split):.3g}, "
                f"mode={self.mode.value}")
