"""Sampler hooks that apply a PTQD record (``algorithms.ptqd``): ε̂ = (ε_q − μ_t)/(1 + k_t)
and the absorbed variance σ_t² − c_t²·σ′²_t/(1 + k_t)²; the statistics are linearly
interpolated between the calibrated time steps."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn



def ptqd_record(model: nn.Module) -> dict[str, Any] | None:
    """The stats of the model's ``ptqd`` method record, if its recipe ran one."""
    from ..quant.prepare import META_ATTR
    for r in getattr(model, META_ATTR, {}).get("methods", []):
        if r["name"] == "ptqd":
            return r["stats"]
    return None


def hooks(stats: dict[str, Any], schedule: Any
          ) -> tuple[Callable[[int, Tensor, Tensor], Tensor], Callable[[int, float], float]]:
    """(eps_hook, var_hook) for ``schedule.sample``; ``schedule`` is its ``DDPMSchedule``
    (not imported here: ``schedule.sample`` imports this module)."""
    ts = np.asarray(stats["t"], dtype=np.float64)
    k = np.asarray(stats["k"], dtype=np.float64)
    mu = np.asarray(stats["mu"], dtype=np.float64)  # [n_t, C]
    var = np.asarray(stats["var"], dtype=np.float64)
    abar, betas = schedule.alphas_cumprod().numpy(), schedule.betas().numpy()

    def at(t: int) -> tuple[float, np.ndarray, float]:
        kt = float(np.interp(t, ts, k))
        mut = np.array([np.interp(t, ts, mu[:, c]) for c in range(mu.shape[1])])
        return kt, mut, float(np.interp(t, ts, var))

    def eps_hook(t: int, x: Tensor, eps: Tensor) -> Tensor:
        kt, mut, _ = at(t)
        shift = torch.as_tensor(mut, dtype=eps.dtype).view(1, -1, *([1] * (eps.dim() - 2)))
        return (eps - shift) / (1.0 + kt)

    def var_hook(t: int, v: float) -> float:
        kt, _, vt = at(t)
        c = betas[t] / (np.sqrt(1 - betas[t]) * np.sqrt(1 - abar[t]))
        return max(v - c * c * vt / (1.0 + kt) ** 2, 0.0)

    return eps_hook, var_hook
