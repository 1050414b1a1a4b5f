"""I-ViT's integer-only non-linearities (Li & Gu, "I-ViT: Integer-only Quantization for Efficient
Vision Transformer Inference", ICCV 2023): Shiftmax, ShiftGELU and I-LayerNorm, on int64 code
tensors with nothing but integer adds, multiplies, shifts and floor divisions.

Every function takes integer codes and integer constants that were computed once from the
float scales (``exp_base``); the scale of each output is stated in its docstring, so a caller
tracks scales as plain numbers and no float tensor op runs at inference.

Shift exponential (I-ViT eq. 6–8), for codes x ≤ 0 of a value x·s:

    x·log₂e ≈ x + (x≫1) − (x≫4)                 (1.4375 for 1.4427)
    x₀ = ⌊−1/s⌋ (the code of −1),  q = ⌊x/x₀⌋,  r = x − x₀q ∈ (x₀, 0]
    2^(x·s·log₂e) ≈ (r/2 − x₀)·2^(−q) · s        (2^f ≈ 1 + f/2 on f ∈ (−1, 0])
    exp_int = ⌊(r/2 − x₀)·2^(n−q)⌋,  scale s/2^n, with x clamped at n·x₀ so q ≤ n

Departures from the public code (zkkli/I-ViT), each for an error measured on the zoo ViT or
on inputs outside the paper's ranges (tests pin each):
- The reciprocal is ⌊2⁶²/Σ⌋ in int64, not ⌊(2³¹−1)/Σ⌋ in int32: with the 31-bit constant a row
  sum must stay far below 2³¹ for the reciprocal to keep bits, so either n or the input
  resolution is starved (the paper's n = 23 leaves ~4 bits in ShiftGELU's reciprocal at
  s = 0.05: GELU(6.15) = 5.91).
- The codes are first shifted left by p bits (exact), so x₀ = ⌊−2^p/s⌋ has ≥ 12 bits: the
  paper's x₀ = ⌊−1/s⌋ rounds the exponent's scale by up to 1/|x₀| (5 % at s = 0.07), which
  cost the zoo ViT 0.7 points of agreement with its fake-quant twin. n keeps the paper's value
  unless a row sum could pass 2^SUM_BITS.
- ShiftGELU subtracts m = max(x, 0) per element, not the row max: σ(t) = e^(t−m)/(e^(t−m) +
  e^(−m)) holds for any m, and with m per element one of the two terms is e⁰, so they never both
  sit at the exponential's floor. With the row max, x = −6.35 in a row whose max is +6.35 gets
  σ = ½ (both terms clamped) and GELU ≈ −3.1 instead of ≈ 0.
- Inputs below the clamp n·x₀ give 0, not the floor value (r/2 − x₀)·2⁰ of the public code:
  that floor is what makes the two ShiftGELU terms equal above, and in Shiftmax it leaks
  2^(−n) of the mass per token.
- I-LayerNorm's mean is exact (``i_layernorm``), and ``isqrt`` runs 24 Newton steps from 2¹⁶,
  not 10: a step from above at most halves k, so 10 steps leave k ≥ 64 and ⌊√v⌋ is wrong for
  every v < 4096.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

RECIP_BITS = 62               # Shiftmax / ShiftGELU take ⌊2^62 / Σ⌋ (module docstring)
SUM_BITS = 40                 # a row's Σ exp stays < 2^SUM_BITS, so the reciprocal keeps 22 bits
RES_BITS = {"shift": 12, "poly": 8}  # |x₀| ≥ 2^RES_BITS after the pre-shift
SOFTMAX_N, GELU_N = 15, 23     # I-ViT's "sufficiently large" n
GELU_ALPHA = 1.702             # GELU(x) ≈ x·σ(1.702x)
NEWTON_START, NEWTON_STEPS = 2 ** 16, 24   # exact ⌊√v⌋ (±1) for v < 2⁴⁴ (paper: 10 steps)


def shift_exp(x: Tensor, x0: int, n: int) -> Tensor:
    """⌊(r/2 − x₀)·2^(n−q)⌋ ≈ 2^n·e^(x·s)/s for codes x ≤ 0 (int64), x₀ = ⌊−1/s⌋."""
    x = x + (x >> 1) - (x >> 4)                      # x·log₂e, in units of s
    under = x < n * x0                               # below 2^−n: 0 (module docstring)
    x = torch.clamp(x, min=n * x0)                   # q ≤ n
    q = torch.div(x, x0, rounding_mode="floor")      # ≥ 0
    r = x - x0 * q                                   # (x₀, 0]
    e = torch.bitwise_left_shift(r - 2 * x0, n - q) >> 1  # ⌊(r − 2x₀)·2^(n−q) / 2⌋
    return e.masked_fill(under, 0)


# I-BERT's i-exp (Kim et al., ICML 2021, Alg. 2): e^r ≈ a(r + b/a)·r + c/a times a on
# r ∈ (−ln 2, 0], a, b, c = 0.35815147, 0.96963238, 1 (the constants transformers' IntSoftmax uses)
POLY_A, POLY_B, POLY_C = 0.35815147, 0.96963238, 1.0


@dataclass(frozen=True)
class ExpBase:
    """Integer constants of an integer exponential at one input scale s: ``kind`` "shift"
    (I-ViT) or "poly" (I-BERT); codes are shifted left by ``p`` first, so x₀ = ⌊−2^p/s⌋
    (shift) or ⌊−ln2·2^p/s⌋ (poly, with b, c the polynomial's codes). An output code is worth
    ``out_scale``; only ratios of outputs are used (softmax, sigmoid)."""
    kind: str
    p: int
    x0: int
    n: int
    b: int = 0
    c: int = 0
    out_scale: float = 1.0


def exp_base(scale: float, n: int, length: int = 1, kind: str = "shift") -> ExpBase:
    """Constants for the integer exponential of codes at ``scale``: the pre-shift p giving
    |x₀| ≥ 2^RES_BITS, and n lowered if needed so that ``length`` outputs (each at most the
    value at x = 0) sum below 2^SUM_BITS."""
    if kind not in RES_BITS:
        raise ValueError(f"unknown integer exponential {kind!r} (shift or poly)")
    p = max(0, math.ceil(RES_BITS[kind] + math.log2(scale)))
    s = scale / 2 ** p  # the scale of the shifted codes
    if kind == "poly":
        x0 = math.floor(-math.log(2) / s)
        b, c = math.floor(POLY_B / POLY_A / s), math.floor(POLY_C / POLY_A / s ** 2)
        top, unit = c, POLY_A * s ** 2
    else:
        x0, b, c = math.floor(-1.0 / s), 0, 0
        top, unit = -x0, s
    n = max(0, min(n, math.floor(SUM_BITS - math.log2(top * length))))
    return ExpBase(kind, p, x0, n, b, c, unit / 2 ** n)


def int_exp(x: Tensor, base: ExpBase) -> Tensor:
    """2^n·e^(x·s) in codes of ``base.out_scale``, for codes x ≤ 0 (int64)."""
    x = torch.bitwise_left_shift(x, base.p)
    return shift_exp(x, base.x0, base.n) if base.kind == "shift" else poly_exp(x, base)


def poly_exp(x: Tensor, base: ExpBase) -> Tensor:
    """I-BERT's i-exp: q = ⌊x/x₀⌋, r = x − x₀q, z = (r + b)·r + c, e = z·2^(n−q)."""
    under = x < base.n * base.x0
    x = torch.clamp(x, min=base.n * base.x0)
    q = torch.div(x, base.x0, rounding_mode="floor")
    r = x - base.x0 * q                              # (x₀, 0]
    e = torch.bitwise_left_shift((r + base.b) * r + base.c, base.n - q)
    return e.masked_fill(under, 0)


def shiftmax(x: Tensor, base: ExpBase, bits: int = 8, dim: int = -1) -> Tensor:
    """Shiftmax of codes x along ``dim``: ⌊e·⌊2⁶²/Σe⌋ / 2^(63−bits)⌋ with e the integer
    exponential of x − max; output codes in [0, 2^(bits−1)], scale 1/2^(bits−1)."""
    e = int_exp(x - x.amax(dim=dim, keepdim=True), base)  # the max itself gives the top value
    factor = (1 << RECIP_BITS) // e.sum(dim=dim, keepdim=True).clamp(min=1)
    return _round_shift(e * factor, RECIP_BITS + 1 - bits)


def shift_gelu(x: Tensor, base: ExpBase, bits: int = 8) -> Tensor:
    """ShiftGELU x·σ(1.702x) of codes x at scale s:
    σ = ⌊e^(t−m)·⌊2⁶²/(e^(t−m) + e^(−m))⌋ / 2^(63−bits)⌋ with m = max(x, 0) (module
    docstring); ``base`` from ``exp_base(1.702·s, GELU_N, 2)``. Output codes x·σ, scale
    s/2^(bits−1)."""
    m = x.clamp(min=0)
    e, e_m = int_exp(x - m, base), int_exp(-m, base)  # one of the two is the top value
    factor = (1 << RECIP_BITS) // (e + e_m).clamp(min=1)
    return x * _round_shift(e * factor, RECIP_BITS + 1 - bits)


def _round_shift(x: Tensor, k: int) -> Tensor:
    """⌊(x + 2^(k−1)) / 2^k⌋: the output codes are rounded, not floored as in the public
    code (flooring biases every probability down by half a code: at 1/128 a row of 50 tokens
    loses ~0.2 of its mass, which shrinks every attention output)."""
    return (x + (1 << (k - 1))) >> k


def isqrt(v: Tensor, steps: int = NEWTON_STEPS) -> Tensor:
    """I-ViT's integer Newton square root: k ← ⌊(k + ⌊v/k⌋)/2⌋ from 2¹⁶, ``steps`` times
    (module docstring: 24, not the paper's 10)."""
    k = torch.full_like(v, NEWTON_START)
    for _ in range(steps):
        k = ((k + torch.div(v, k, rounding_mode="floor")) >> 1).clamp(min=1)
    return k


def i_layernorm(x: Tensor) -> Tensor:
    """I-LayerNorm's normalisation of codes over the last axis (C entries):
    y = C·x − Σx (= C·(x − μ), exact), σ' = isqrt(Σy²) (= C·√C·std),
    out = ⌊y·⌊(2³¹−1)/σ'⌋ / 2⌋ — the normalised value (x − μ)/std in units of √C/2³⁰. The
    affine γ, β is left to the caller (a per-channel scale and an integer bias,
    ``layernorm_affine``). I-ViT subtracts round(Σx/C) instead: half a code of error in the
    mean, 1–2 % of a row's std at 8 bits, which measurably moved the zoo ViT's predictions."""
    c = x.shape[-1]
    y = c * x - x.sum(-1, keepdim=True)  # [..., C]; |y| ≤ C·2^bits, Σy² < 2⁴⁴ for C ≤ 1024
    factor = (2 ** 31 - 1) // isqrt((y * y).sum(-1, keepdim=True))
    return (y * factor) >> 1


def layernorm_affine(weight: Tensor, bias: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sign, bias codes, per-channel scale) so that γ·norm + β = scale·(sign·out + b_int) for
    ``out`` of ``i_layernorm``: scale = |γ|·√C/2³⁰, b_int = round(β/scale) (I-ViT folds β/γ;
    the sign keeps scales positive for dyadic requantisation)."""
    gamma = weight.detach().double()
    mag = gamma.abs().clamp(min=1e-6 * float(gamma.abs().max().clamp(min=1e-30)))
    scale = mag * math.sqrt(c) / 2 ** 30
    sign = torch.where(gamma < 0, -1, 1).to(torch.int64)
    b_int = torch.round(bias.detach().double() / scale).to(torch.int64)
    return sign, b_int, scale
