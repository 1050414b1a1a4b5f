"""Hadamard matrices of the sizes LLMs use, and the randomised orthogonal rotations built on them.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I (n = 1, 2 or a multiple of 4).
Built here (our own code, from the textbook constructions; QuaRot's public code instead ships
tables of the small factors):

* Sylvester: H_1 = [1], H_2k = [[H_k, H_k], [H_k, −H_k]] (n a power of two);
* Paley I (q prime, q ≡ 3 mod 4, n = q + 1): H = I + S with S = [[0, 1ᵀ], [−1, Jq]], Jq the
  Jacobsthal matrix Jq[i, j] = χ(j − i) (χ the Legendre symbol mod q) — gives 12 (q = 11);
* Paley II (q prime, q ≡ 1 mod 4, n = 2(q + 1)): with the symmetric conference matrix
  C = [[0, 1ᵀ], [1, Jq]], H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] — gives 36 (q = 17);
* Kronecker products: H_a ⊗ H_b is Hadamard of order a·b, so n = 2^k · m takes Sylvester(2^k)
  ⊗ Paley(m) (SmolLM2: 576 = 16·36, 1536 = 128·12).

The rotation is Q = D·H/√n with D = diag(random ±1) (QuaRot's ``random_hadamard_matrix``,
seeded), orthogonal. A size with no construction here falls back to a seeded random orthogonal
matrix (QR of a Gaussian, columns sign-corrected so the draw is uniform); ``rotation`` says
which one it built.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def sylvester(n: int) -> Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Jq[i, j] = χ(j − i) for a prime q (χ(0) = 0, χ(a) = ±1 for (non-)residues)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)],
                       dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q          # [q, q]: j − i
    return chi[idx]


def _bordered(jq: Tensor, col: float) -> Tensor:
    """[[0, 1ᵀ], [col·1, Jq]]."""
    q = jq.shape[0]
    top = torch.cat([torch.zeros(1, 1, dtype=jq.dtype), torch.ones(1, q, dtype=jq.dtype)], 1)
    rest = torch.cat([torch.full((q, 1), col, dtype=jq.dtype), jq], 1)
    return torch.cat([top, rest], 0)


def paley(n: int) -> Tensor | None:
    """A Paley Hadamard matrix of order n (float64), or None when neither construction fits."""
    q = n - 1
    if n % 4 == 0 and _is_prime(q) and q % 4 == 3:                           # Paley I
        return torch.eye(n, dtype=torch.float64) + _bordered(_jacobsthal(q), -1.0)
    q = n // 2 - 1
    if n % 4 == 0 and _is_prime(q) and q % 4 == 1:                           # Paley II
        c = _bordered(_jacobsthal(q), 1.0)                                   # [q+1, q+1]
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k·m and a Hadamard matrix of order m known here (m = 1 for a power
    of two; else the smallest Paley order), or None."""
    if n >= 1 and not n & (n - 1):
        return n, 1
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    while k >= 1:   # the largest power-of-two factor first: the smallest Paley factor m
        if n % k == 0 and paley(n // k) is not None:
            return k, n // k
        k //= 2
    return None


def hadamard(n: int) -> Tensor | None:
    """A Hadamard matrix of order n (float64, H·Hᵀ = n·I) as Sylvester ⊗ Paley, or None."""
    f = hadamard_factors(n)
    if f is None:
        return None
    a, m = f
    return sylvester(a) if m == 1 else torch.kron(sylvester(a), paley(m))


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal matrix: QR of a Gaussian, Q·diag(sign(diag R))."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, seed: int) -> tuple[Tensor, dict]:
    """(Q [n, n] float64 orthogonal, how it was built): D·H/√n with seeded random signs D, or
    a random orthogonal matrix when no Hadamard of order n is constructed here."""
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, seed), {"kind": "random_orthogonal", "size": n,
                                            "why": f"no Hadamard construction for {n} here"}
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))
    d = (2.0 * signs - 1.0).to(torch.float64)
    a, m = hadamard_factors(n)
    return d[:, None] * h / math.sqrt(n), {"kind": "randomized_hadamard", "size": n,
                                           "factors": [a, m]}


def kron_factors(n: int) -> tuple[Tensor, Tensor] | None:
    """Orthogonal (A, B) with A ⊗ B = H_n/√n (float64): the Sylvester and Paley factors of
    ``hadamard(n)``, a power of two split into two Sylvester halves; None without a Hadamard."""
    f = hadamard_factors(n)
    if f is None:
        return None
    a, m = f
    if m == 1:
        m = 1 << (a.bit_length() - 1) // 2
        a //= m
        b = sylvester(m)
    else:
        b = paley(m)
    return sylvester(a) / math.sqrt(a), b / math.sqrt(m)
