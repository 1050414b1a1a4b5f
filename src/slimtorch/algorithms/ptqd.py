"""PTQD: correct a quantized diffusion model's noise prediction in the sampler (He et al.,
NeurIPS 2023, arXiv:2305.10657).

The quantization noise Δ = ε_q − ε of the noise prediction is split into a part correlated
with ε and a residual: ε_q = (1 + k_t)·ε + Δ′_t. On the calibration pairs (x_t, t), per time
step t, k_t is the least-squares slope of Δ on ε with a per-channel intercept, k_t =
Σ_c cov_c(ε, Δ)/Σ_c var_c(ε); μ_t (per channel) the mean of Δ′ = Δ − k_t·ε and σ′²_t its
variance around μ_t. At sampling (``diffusion.ptqd``) the
prediction becomes ε̂ = (ε_q − μ_t)/(1 + k_t) (correlated-noise and bias correction), and a
stochastic sampler absorbs the residual noise into its own: σ_t² ← max(σ_t² −
c_t²·σ′²_t/(1 + k_t)², 0), c_t = β_t/(√α_t·√(1 − ᾱ_t)) the factor of ε in the DDPM step.
Steps between the calibrated ones are linearly interpolated in t. The paper estimates the
statistics on generated samples at every step of its sampler; here they come from the
recipe's calibration pairs (the float trajectory), so a ``uniform`` calibration set spans the
schedule. Nothing in the network changes: the statistics are data in the artifact.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import DiffusionError
from ..methods import MethodConfig, MethodContext, register_method


class PTQDConfig(MethodConfig):
    """variance: absorb the residual noise into stochastic samplers' variance; bias: subtract
    μ_t."""
    bias: bool = True
    variance: bool = True


@register_method("ptqd", PTQDConfig)
@torch.no_grad()
def apply(model, cfg: PTQDConfig, ctx: MethodContext) -> dict[str, Any]:
    from ..diffusion.schedule import eps_of
    if ctx.float_model is None:
        raise DiffusionError("ptqd compares the quantized with the float model: it cannot run "
                             "with inplace=True")
    if ctx.recipe.calib.source != "diffusion":
        raise DiffusionError("ptqd needs (x_t, t) calibration pairs: use `calib: {source: "
                             "diffusion}` in the recipe")
    acc: dict[int, dict[str, torch.Tensor]] = {}
    for x, t in ctx.batches:
        eps = eps_of(ctx.float_model, x, t).double()  # [b, C, H, W]
        delta = eps_of(model, x, t).double() - eps
        for tv in t.unique().tolist():
            m = t == tv
            e = eps[m].transpose(0, 1).reshape(eps.shape[1], -1)  # [C, values]
            d = delta[m].transpose(0, 1).reshape(eps.shape[1], -1)
            sums = {"n": e.shape[1], "e": e.sum(1), "d": d.sum(1), "ee": (e * e).sum(1),
                    "ed": (e * d).sum(1), "dd": (d * d).sum(1)}  # each [C] (n: values/channel)
            a = acc.setdefault(int(tv), {k: 0 for k in sums})
            for k, v in sums.items():
                a[k] = a[k] + v
    ts, ks, mus, vars_ = [], [], [], []
    for tv in sorted(acc):
        a = acc[tv]
        n = a["n"]
        # least squares with a per-channel intercept: k = Σ_c cov_c(ε, Δ) / Σ_c var_c(ε)
        k = float((a["ed"] - a["e"] * a["d"] / n).sum() / (a["ee"] - a["e"] ** 2 / n).sum())
        mu = (a["d"] - k * a["e"]) / n  # [C] mean of Δ′ = Δ − kε
        # E[(Δ′ − μ)²] per channel, averaged: Δ′'s second moment minus μ²
        second = (a["dd"] - 2 * k * a["ed"] + k * k * a["ee"]) / n  # [C]
        ts.append(tv)
        ks.append(round(k, 6))
        mus.append([round(float(v), 6) if cfg.bias else 0.0 for v in mu])
        vars_.append(round(max(float((second - mu * mu).mean()), 0.0), 8))
    return {"t": ts, "k": ks, "mu": mus, "var": vars_ if cfg.variance else [0.0] * len(ts)}
