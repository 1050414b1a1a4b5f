"""Logarithmic quantizers for post-softmax activations: log√2 (RepQ-ViT) and plain log2.

log√2 (RepQ-ViT, Li et al. 2023, ``quantizer.py``), spec kind ``log2sqrt2``:

    q  = clip(⌊−2·log2(x/Δ)⌉, 0, 2^b − 1)
    x̂  = Δ · 2^(−⌈q/2⌉) · (1 + (√2 − 1)·[q odd])      (= Δ · √2^(−q) exactly)
    x̂  = 0 where the unclipped code ⌊−2·log2(x/Δ)⌉ ≥ 2^b (and for x ≤ 0)

Δ is chosen among the 99.9 / 99.99 / 99.999 percentiles of the observed values by the mean
squared error of x̂ (as the published code does). The forward uses a straight-through gradient
(x̂ = x + (x̂ − x).detach()) so gradient-based methods can run through it.

Lowered form for inference: ``quantize_int`` gives the codes q (2^b means "zero");
``shift_form`` splits them into a right shift ⌈q/2⌉ and an odd flag, so x̂ = Δ·m >> ⌈q/2⌉ with
m = 1 (q even) or √2 (q odd) — a shift plus one fixed multiplier per element.

State (Δ) lives in the ``scale`` buffer, so save/load is bit-exact.

Plain log2 (spec kind ``log2``; Agile-Quant, Shen et al. 2024, after FQ-ViT's log2 softmax
quantizer, Lin et al. 2022, which Agile-Quant cites), for values in [0, 1] such as attention
probabilities, no calibrated state:

    k  = round(−log2 x)                 (+inf for x ≤ 0)
    x̂  = 2^−k   where 0 ≤ k ≤ 2^b − 1   (k < 0, i.e. x > √2, is clipped to k = 0: x̂ = 1)
    x̂  = 0      where k ≥ 2^b            (FQ-ViT's mask; 2^b − 1 = 15 at 4 bits)

The zero branch is a conscious choice over the bare formula k = clip(round(−log2 x), 0, 15):
clipping would turn every causally masked probability (exactly 0) into 2^−15 and let each
query read a little of every *future* value, an information leak that flatters perplexity.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .quantizer import Mode, Quantizer

PERCENTILES = (0.999, 0.9999, 0.99999)
SQRT2_M1 = math.sqrt(2.0) - 1.0


class SampledQuantizer(Quantizer):
    """A per-tensor quantizer whose ``observe`` always keeps a bounded, seeded value sample
    (whatever the spec's observer), because its initialisation searches on values."""

    def _observe(self, x: Tensor) -> None:
        rows = x.detach().float().reshape(1, -1)  # [1, numel]
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if "lo" in self._stats:
            lo, hi = torch.minimum(lo, self._stats["lo"]), torch.maximum(hi, self._stats["hi"])
        self._stats["lo"], self._stats["hi"] = lo, hi
        gen = torch.Generator().manual_seed(self.seed + len(self._stats.get("samples", [])))
        k = max(1, self.max_samples // 16)
        keep = (rows[0] if rows.shape[1] <= k else
                rows[0, torch.randint(rows.shape[1], (k,), generator=gen)])  # all, or a sample
        self._stats.setdefault("samples", []).append(keep.clone())

    def _sample(self) -> Tensor:
        if "samples" not in self._stats:
            raise RuntimeError("activation quantizer saw no data during calibration")
        sample = torch.cat(self._stats["samples"])  # [n]
        if sample.numel() > self.max_samples:  # bounded, seeded subsample
            gen = torch.Generator().manual_seed(self.seed)
            sample = sample[torch.randperm(sample.numel(), generator=gen)[: self.max_samples]]
        self._stats = {}
        return sample


def log2sqrt2_codes(x: Tensor, delta: Tensor, bits: int) -> Tensor:
    """Unclipped codes ⌊−2·log2(x/Δ)⌉ as float (+inf for x ≤ 0)."""
    ratio = (x / delta).clamp(min=0)
    return torch.round(-2.0 * torch.log2(ratio))  # log2(0) = −inf → +inf


def log2sqrt2_dequant(q: Tensor, delta: Tensor, bits: int) -> Tensor:
    """x̂ from codes in [0, 2^b]; the code 2^b stands for zero."""
    qc = q.clamp(0, 2 ** bits - 1)
    odd = torch.remainder(qc, 2)
    val = delta * torch.pow(2.0, -torch.ceil(qc / 2)) * (1 + SQRT2_M1 * odd)
    return torch.where(q >= 2 ** bits, torch.zeros_like(val), val)


def log2sqrt2_quant(x: Tensor, delta: Tensor, bits: int) -> Tensor:
    """x̂ of the log√2 quantizer (no gradient trick)."""
    q = log2sqrt2_codes(x, delta, bits)
    q = torch.where(q >= 2 ** bits, torch.full_like(q, 2 ** bits), q.clamp(min=0))
    return log2sqrt2_dequant(q, delta, bits)


class Log2Sqrt2Quantizer(SampledQuantizer):
    """Per-tensor log√2 quantizer (spec kind ``log2sqrt2``); Δ in ``scale``."""

    def fake_quant(self, x: Tensor) -> Tensor:
        xq = log2sqrt2_quant(x.detach(), self.scale, self.spec.bits).to(x.dtype)
        return x + (xq - x).detach()

    def finish_observe(self) -> None:
        sample = self._sample()
        self.scale = search_delta(sample, self.spec.bits).reshape(())
        self.zero_point = torch.zeros(())
        self.mode = Mode.QUANT

    def quantize_int(self, x: Tensor) -> Tensor:
        q = log2sqrt2_codes(x, self.scale, self.spec.bits)
        q = torch.where(q >= 2 ** self.spec.bits, torch.full_like(q, 2 ** self.spec.bits),
                        q.clamp(min=0))
        return q.to(torch.int16)

    def dequantize_int(self, q: Tensor) -> Tensor:
        return log2sqrt2_dequant(q.float(), self.scale, self.spec.bits)

    def shift_form(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(shift ⌈q/2⌉, odd flag, zero flag) with x̂ = Δ·(√2 if odd else 1)·2^−shift."""
        qc = q.clamp(0, 2 ** self.spec.bits - 1)
        return (qc + 1) // 2, qc % 2, q >= 2 ** self.spec.bits

    def extra_repr(self) -> str:
        return f"log2sqrt2, bits={self.spec.bits}, mode={self.mode.value}"


@torch.no_grad()
def search_delta(sample: Tensor, bits: int, percentiles=PERCENTILES) -> Tensor:
    """Δ among the given percentiles of ``sample`` with the least mean squared error."""
    best, best_d = float("inf"), sample.abs().max().clamp(min=1e-8)
    for p in percentiles:
        d = torch.quantile(sample, p).clamp(min=1e-8)
        err = (log2sqrt2_quant(sample, d, bits) - sample).square().mean().item()
        if err < best:
            best, best_d = err, d
    return best_d


def log2_codes(x: Tensor) -> Tensor:
    """Unclipped codes round(−log2 x) as float (+inf for x ≤ 0)."""
    return torch.round(-torch.log2(x.clamp(min=0)))


def log2_quant(x: Tensor, bits: int) -> Tensor:
    """x̂ = 2^−clip(round(−log2 x), 0, 2^b − 1), and 0 where round(−log2 x) ≥ 2^b."""
    k = log2_codes(x)
    val = torch.pow(2.0, -k.clamp(0, 2 ** bits - 1))
    return torch.where(k >= 2 ** bits, torch.zeros_like(val), val)


class Log2Quantizer(Quantizer):
    """Plain log2 quantizer (spec kind ``log2``): x̂ = 2^−k on [0, 1]; nothing to calibrate
    (``scale`` stays 1, kept so integer lowering sees the same buffers as other kinds)."""

    def _observe(self, x: Tensor) -> None:
        self._stats["seen"] = True

    def finish_observe(self) -> None:
        if not self._stats:
            raise RuntimeError("activation quantizer saw no data during calibration")
        self.scale, self.zero_point = torch.ones(()), torch.zeros(())
        self.mode, self._stats = Mode.QUANT, {}

    def fake_quant(self, x: Tensor) -> Tensor:
        xq = log2_quant(x.detach().float(), self.spec.bits).to(x.dtype)
        return x + (xq - x).detach()

    def quantize_int(self, x: Tensor) -> Tensor:
        """Codes k in [0, 2^b − 1], and 2^b for zero."""
        k = log2_codes(x.float())
        return torch.where(k >= 2 ** self.spec.bits, torch.full_like(k, 2 ** self.spec.bits),
                           k.clamp(min=0)).to(torch.int16)

    def dequantize_int(self, q: Tensor) -> Tensor:
        k = q.float()
        val = torch.pow(2.0, -k.clamp(0, 2 ** self.spec.bits - 1))
        return torch.where(k >= 2 ** self.spec.bits, torch.zeros_like(val), val)

    def extra_repr(self) -> str:
        return f"log2, bits={self.spec.bits}, mode={self.mode.value}"
