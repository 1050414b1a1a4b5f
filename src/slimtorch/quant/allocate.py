"""Mixed precision: per-layer weight bit widths under a budget, written as an ordinary recipe.

Given, per layer ℓ, a cost c_ℓ(b) = n_ℓ·b (weight-code bits of its n_ℓ weights) and a
sensitivity s_ℓ(b) for each candidate b (``eval.sensitivity``), ``allocate`` solves

    min Σ_ℓ s_ℓ(b_ℓ)   subject to   Σ_ℓ c_ℓ(b_ℓ) ≤ B

exactly by dynamic programming over the total cost in units of g = gcd of all costs (a
multiple-choice knapsack). When B/g exceeds ``max_states`` the unit is coarsened and costs are
rounded *up* to it, so the budget still holds; the result then says ``exact: false``.
The budget is given as average weight bits (B = avg · Σ n_ℓ) or as bytes of weight codes
(B = 8·bytes; scales, zero points and float tensors are not counted).

``mixed_recipe`` writes the allocation into the base recipe's per-layer override map
(``overrides: {fqn: {weights: b}}``), which the user can read, edit and run like any recipe.

``coding_length``: the lossy coding length of Attention Round (Diao et al. 2022, after Ma et al.
2007), L(W) = ((m+n)/2)·log₂det(I + n/(ε²m)·WWᵀ) for W reshaped to [m, n] = [output channels,
inputs per output]. Its criterion ``coding_length`` for the DP is s_ℓ(b) = L(W_ℓ)·2^(−2b): a
layer's information content times the distortion–rate decay of a b-bit uniform quantizer (our
choice; the paper assigns bits by the coding length without a stated budget rule).
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import SlimtorchError

MAX_STATES = 1 << 21
EPS_CODING = 0.5  # default ε of the coding length, as a multiple of the layer's rms(W)


def coding_length(w: Tensor, eps: float) -> float:
    """L(W) = ((m+n)/2)·log₂det(I_m + n/(ε²m)·WWᵀ), W as [m, n] (rows = output channels)."""
    w2 = w.detach().double().reshape(w.shape[0], -1)  # [m, n]
    m, n = w2.shape
    c = n / (eps * eps * m)
    gram = w2 @ w2.T if m <= n else w2.T @ w2  # det(I + cWWᵀ) = det(I + cWᵀW)
    _, logdet = torch.linalg.slogdet(torch.eye(gram.shape[0], dtype=gram.dtype) + c * gram)
    return float((m + n) / 2 * logdet / math.log(2))


def allocate(costs: list[dict[int, int]], values: list[dict[int, float]], budget: int,
             max_states: int = MAX_STATES) -> dict[str, Any]:
    """Per-layer choice minimising Σ values under Σ costs ≤ ``budget`` (module docstring).
    Returns {"bits": [b per layer], "cost", "value", "exact", "unit"}."""
    if len(costs) != len(values) or not costs:
        raise SlimtorchError("allocation needs one cost and one value table per layer")
    options = [sorted(c) for c in costs]
    floor = sum(min(c.values()) for c in costs)
    if budget < floor:
        raise SlimtorchError(f"the budget ({budget} weight bits) is below the smallest model "
                             f"({floor} bits: every layer at its fewest bits); raise it")
    unit = reduce(math.gcd, [c[b] for c in costs for b in c])
    exact = budget // unit <= max_states
    if not exact:
        unit = -(-budget // max_states)
    size = budget // unit + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for c, v, opts in zip(costs, values, options):
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int8 if len(opts) <= 127 else np.int32)
        for i, b in enumerate(opts):
            k = -(-c[b] // unit)  # rounded up: never under-counts
            if k >= size:
                continue
            cand = np.full(size, np.inf)
            cand[k:] = best[:size - k] + v[b]
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise SlimtorchError("no allocation fits the budget; raise it")
    chosen, at = [], end
    for c, opts, pick in zip(reversed(costs), reversed(options), reversed(picks)):
        b = opts[pick[at]]
        chosen.append(b)
        at -= -(-c[b] // unit)
    chosen.reverse()
    return {"bits": chosen, "cost": sum(c[b] for c, b in zip(costs, chosen)),
            "value": float(sum(v[b] for v, b in zip(values, chosen))), "exact": exact,
            "unit": unit}


def budget_bits(params: list[int], avg_bits: float | None = None,
                size_bytes: int | None = None) -> int:
    """The budget in weight-code bits from exactly one of ``avg_bits`` / ``size_bytes``."""
    if (avg_bits is None) == (size_bytes is None):
        raise SlimtorchError("state one budget: average weight bits (--avg-bits 4) or bytes of "
                             "weight codes (--size-bytes 120000)")
    if avg_bits is not None:
        if avg_bits <= 0:
            raise SlimtorchError(f"--avg-bits must be positive, got {avg_bits}")
        return math.floor(avg_bits * sum(params) + 1e-9)
    if size_bytes <= 0:
        raise SlimtorchError(f"--size-bytes must be positive, got {size_bytes}")
    return 8 * int(size_bytes)


CRITERIA = ("kl", "agreement_drop", "hawq", "sqnr", "coding_length")


def allocate_from_sensitivity(sens: dict[str, Any], *, avg_bits: float | None = None,
                              size_bytes: int | None = None, criterion: str = "kl",
                              bits: list[int] | None = None) -> dict[str, Any]:
    """Allocation over the layers of a ``layer_sensitivity`` result: {fqn: bits} + summary."""
    if criterion not in CRITERIA:
        raise SlimtorchError(f"unknown criterion {criterion!r}; choose one of "
                             f"{', '.join(CRITERIA)}")
    avail = [int(b) for b in sens["bits"]]
    bits = avail if bits is None else [int(b) for b in bits]
    missing = sorted(set(bits) - set(avail))
    if missing:
        raise SlimtorchError(f"bits {missing} were not measured (measured: {avail}); rerun "
                             "sensitivity with them or drop them")
    layers = sens["layers"]
    params = [l["params"] for l in layers]
    costs = [{b: n * b for b in bits} for n in params]
    values = [{b: float(_at(l[criterion], b)) for b in bits} for l in layers]
    budget = budget_bits(params, avg_bits, size_bytes)
    res = allocate(costs, values, budget)
    res.update(budget=budget, criterion=criterion, avg_bits=res["cost"] / sum(params),
               layers={l["fqn"]: b for l, b in zip(layers, res["bits"])})
    return res


def _at(table: dict, b: int):
    """``table[b]`` whether the keys are ints or (read back from JSON) strings."""
    return table[b] if b in table else table[str(b)]


def mixed_recipe(base, alloc: dict[str, Any], name: str | None = None):
    """``base`` (a Recipe) with the allocation as its per-layer override map: each layer's
    weight bits; activation bits stay as the base says (first/last layer overrides too)."""
    from ..recipe import Recipe
    d = base.to_dict()
    ov = {fqn: {"weights": b} for fqn, b in alloc["layers"].items()}
    ov.update(d.get("overrides", {}))  # the base's own entries come after: ours match first
    d.update(name=name or f"{base.name}-mixed-{alloc['criterion']}-{alloc['avg_bits']:.2f}b",
             description=(f"mixed precision by {alloc['criterion']} (slimtorch allocate): "
                          f"average {alloc['avg_bits']:.3f} weight bits, budget "
                          f"{alloc['budget']} weight bits"),
             overrides=ov)
    return Recipe.from_dict(d, source=d["name"])


def coding_length_recipe(model, plan: dict[str, Any], recipe):
    """``recipe`` with its ``mixed:`` option resolved: every layer the plan quantizes the
    weights of gets the bits of the coding-length allocation (``overrides``, first in the
    map); returns (resolved recipe without ``mixed``, the allocation record)."""
    from ..recipe import Recipe
    mx = recipe.mixed
    fqns = [f for f, p in plan["layers"].items() if p["weights"] is not None]
    if not fqns:
        raise SlimtorchError(f"recipe {recipe.name!r} has `mixed:` but quantizes no weights")
    params, values = [], []
    for f in fqns:
        w = model.get_submodule(f).weight.detach()
        cl = coding_length(w, mx.eps * w.float().square().mean().sqrt().item())
        params.append(w.numel())
        values.append({b: cl * 2.0 ** (-2 * b) for b in mx.bits})
    res = allocate([{b: n * b for b in mx.bits} for n in params], values,
                   budget_bits(params, avg_bits=mx.avg_bits))
    layers = dict(zip(fqns, res["bits"]))
    d = recipe.to_dict()
    d.update(mixed=None, overrides={**{f: {"weights": b} for f, b in layers.items()},
                                    **d["overrides"]})
    record = {"criterion": mx.criterion, "avg_bits": res["cost"] / sum(params),
              "budget": res["cost"], "exact": res["exact"], "layers": layers}
    return Recipe.from_dict(d, source=recipe.name), record
