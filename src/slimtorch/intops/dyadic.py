"""Fixed-point (dyadic) requantisation: a real multiplier M applied as an integer multiply and a
rounding right shift, as in integer-only inference (Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §2.2; the dyadic
numbers m/2^k of HAWQ-V3, Yao et al., ICML 2021).

    M ≈ m · 2^−k,   2^(b−1) ≤ m < 2^b   ⇒   |M − m·2^−k| ≤ 2^−(k+1) ≤ M · 2^−b

    requantize(acc) = clip(⌊(acc·m + 2^(k−1)) / 2^k⌋ + z, q_min, q_max)

With b = 31 and |acc| < 2^31 the product fits in int64. The rounding is half-up (ties toward
+∞), where ``torch.round`` rounds ties to even: the two differ by one code on exact ties only.
"""
from __future__ import annotations

import torch
from torch import Tensor

MANTISSA_BITS = 31
MAX_SHIFT = 62


def dyadic(multiplier: Tensor | float, bits: int = MANTISSA_BITS) -> tuple[Tensor, Tensor]:
    """(m, k) int64 tensors with ``multiplier ≈ m·2^−k`` and ``2^(bits−1) ≤ m < 2^bits``.

    Multipliers must be positive and below 2^(bits−1) (requantisation multipliers are
    s_x·s_w/s_out, far below that); tiny multipliers have their shift capped at 62 bits.
    """
    mult = torch.as_tensor(multiplier, dtype=torch.float64)
    if torch.any(mult <= 0) or not torch.all(torch.isfinite(mult)):
        raise ValueError("dyadic multipliers must be positive and finite")
    mant, exp = torch.frexp(mult)  # mult = mant·2^exp, mant ∈ [0.5, 1)
    m = torch.round(mant * 2.0 ** bits).to(torch.int64)  # ∈ [2^(bits−1), 2^bits]
    k = bits - exp.to(torch.int64)
    carry = m == 2 ** bits  # rounding reached 2^bits: halve m, shift one less
    m, k = torch.where(carry, m // 2, m), torch.where(carry, k - 1, k)
    if torch.any(k < 1):
        raise ValueError(f"multiplier too large for a {bits}-bit dyadic number")
    excess = (k - MAX_SHIFT).clamp(min=0)  # tiny multipliers: fewer mantissa bits, rounded
    m = torch.where(excess > 0, rounding_shift(m, excess.clamp(min=1)), m)
    return m, k - excess


def rounding_shift(x: Tensor, k: Tensor) -> Tensor:
    """⌊(x + 2^(k−1)) / 2^k⌋ for int64 x and shifts k ≥ 1 (round half up)."""
    half = torch.bitwise_left_shift(torch.ones_like(k), k - 1)
    return torch.bitwise_right_shift(x + half, k)


def requantize(acc: Tensor, m: Tensor, k: Tensor, zero_point: int | Tensor, qmin: int,
               qmax: int) -> Tensor:
    """Integer codes clip(round(acc·m·2^−k) + z) of int32 accumulators (per-channel m, k
    broadcast along the last axis). Returns int64."""
    y = rounding_shift(acc.to(torch.int64) * m, k)
    return torch.clamp(y + torch.as_tensor(zero_point, dtype=torch.int64), qmin, qmax)


def dyadic_value(m: Tensor, k: Tensor) -> Tensor:
    """The real number m·2^−k (float64), to measure the approximation error."""
    return m.to(torch.float64) * torch.pow(2.0, -k.to(torch.float64))
