"""The DDPM noise schedule and the DDIM / DDPM samplers, written from their update formulas.

The schedule (betas, ᾱ) comes from ``diffusers.DDPMScheduler``; the update steps are written
out here because PTQD's correction (``diffusion.ptqd``) changes the predicted noise and the
ancestral variance inside the step. ``tests/test_diffusion.py`` pins both steps to diffusers'
``DDIMScheduler.step`` / ``DDPMScheduler.step`` (same configuration, same noise).

- DDIM (Song et al., 2021), η = 0: x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, clipped to [−1, 1];
  x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂ with ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t), the noise
  re-derived from the clipped x̂₀ (diffusers' ``use_clipped_model_output=True``; its default
  is False, the network's own ε). A conscious choice: on zoo:ddpm (1 M params, 5 epochs) the
  unclipped ε drifts x_t off the data range, and more steps make it worse — 300 DDIM-50
  samples score FD 2.1 with ε̂ and 6.7 (500 samples) with ε; DDIM-100 with ε scores 11.4.
  ``DDPMSchedule(clipped_eps=False)`` gives diffusers' default. ᾱ_prev = 1 after the last
  step. Time steps: "leading" spacing, t = k·T/S.
- DDPM (Ho et al., 2020): x̂₀ as above, posterior mean c₀·x̂₀ + c_t·x_t with
  c₀ = √ᾱ_{t−1}β_t/(1−ᾱ_t), c_t = √α_t(1−ᾱ_{t−1})/(1−ᾱ_t), plus σ_t·z, σ_t² = β̃_t =
  (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t ("fixed_small"), no noise at t = 0.

The network is called with the true time step t ∈ [0, T−1] of the 1000-step schedule even when
the sampler skips steps (PTQ4DM's public code feeds respaced indices instead; we do not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import SlimtorchError

Sampler = Literal["ddim", "ddpm"]
# (t, x_t, eps) -> eps: PTQD's correction of a quantized model's prediction at step t
EpsHook = Callable[[int, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DDPMSchedule:
    """Linear β schedule of Ho et al.: T steps, β from ``beta_start`` to ``beta_end``."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True
    clipped_eps: bool = True  # DDIM: ε re-derived from the clipped x̂₀ (see module doc)

    def betas(self) -> Tensor:  # [T] float64
        from diffusers import DDPMScheduler
        return self.scheduler(DDPMScheduler).betas.double()

    def alphas_cumprod(self) -> Tensor:  # [T] float64
        return torch.cumprod(1.0 - self.betas(), 0)

    def scheduler(self, cls):
        """A diffusers scheduler of class ``cls`` with this configuration (for tests)."""
        return cls(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                   beta_end=self.beta_end, beta_schedule="linear",
                   clip_sample=self.clip_sample)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x₀) = √ᾱ_t x₀ + √(1−ᾱ_t) ε; x0/noise [B, ...], t [B]."""
        abar = self.alphas_cumprod().float()[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def timesteps_for(sampler: Sampler, steps: int, schedule: DDPMSchedule) -> list[int]:
    """The descending network time steps a sampler visits: all T for DDPM, S leading-spaced
    ones for DDIM (t = k·(T // S), k = S−1 … 0)."""
    T = schedule.num_train_timesteps
    if sampler == "ddpm":
        return list(range(T - 1, -1, -1))
    if sampler != "ddim":
        raise SlimtorchError(f"unknown sampler {sampler!r}: use 'ddim' or 'ddpm'")
    if not 1 <= steps <= T:
        raise SlimtorchError(f"DDIM steps must be in 1..{T} (the schedule's length), "
                             f"got {steps}")
    return [k * (T // steps) for k in range(steps - 1, -1, -1)]


def eps_of(model: nn.Module, x: Tensor, t: int | Tensor) -> Tensor:
    """The model's noise prediction for x [B, C, H, W] at time step t (int or [B]); accepts
    models returning a Tensor or a diffusers output (``.sample``)."""
    if not torch.is_tensor(t):
        t = torch.full((x.shape[0],), int(t), dtype=torch.long)
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def _x0(x: Tensor, eps: Tensor, abar: float, clip: bool) -> Tensor:
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
    return x0.clamp(-1, 1) if clip else x0


def ddim_step(x: Tensor, eps: Tensor, abar_t: float, abar_prev: float, clip: bool,
              clipped_eps: bool = True) -> Tensor:
    """One deterministic DDIM step (η = 0) from x_t to x_prev; ``clipped_eps``: continue with
    the noise implied by the clipped x̂₀ rather than the network's ε."""
    x0 = _x0(x, eps, abar_t, clip)
    if clip and clipped_eps:
        eps = (x - abar_t ** 0.5 * x0) / (1 - abar_t) ** 0.5
    return abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


def ddpm_posterior(x: Tensor, eps: Tensor, t: int, abar: Tensor, betas: Tensor, clip: bool
                   ) -> tuple[Tensor, float]:
    """Mean of q(x_{t−1} | x_t, x̂₀) and its variance β̃_t (0 at t = 0)."""
    a_t, a_prev = float(abar[t]), float(abar[t - 1]) if t > 0 else 1.0
    beta = float(betas[t])
    x0 = _x0(x, eps, a_t, clip)
    mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + \
        ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    var = (1 - a_prev) / (1 - a_t) * beta if t > 0 else 0.0
    return mean, var


@torch.inference_mode()
def sample(model: nn.Module, n: int, *, sampler: Sampler = "ddim", steps: int = 50,
           seed: int = 0, shape: tuple[int, ...] = (1, 28, 28), batch_size: int = 250,
           schedule: DDPMSchedule | None = None, eps_hook: EpsHook | None = None,
           var_hook: Callable[[int, float], float] | None = None,
           record: Callable[[int, int, Tensor], None] | None = None,
           stop_at: int | None = None, ptqd: bool = True, progress: bool = False) -> Tensor:
    """``n`` samples [n, *shape] in [−1, 1]. Sample i's noise depends only on (seed, i), so
    float and quantized models sampled with one seed are paired image by image. ``record(
    start, t, x_t)`` sees every batch's x_t before each network call (calibration sets);
    ``eps_hook`` corrects the noise prediction and ``var_hook(t, σ²)`` the ancestral variance
    (PTQD; by default a quantized model's own ``ptqd`` record, unless ``ptqd=False``).
    ``stop_at``: stop before the first step below that t (calibration sets that need
    no later x_t; the x returned are then unfinished)."""
    schedule = schedule or DDPMSchedule()
    if ptqd and eps_hook is None and var_hook is None:  # the model's own PTQD correction
        from .ptqd import hooks, ptqd_record
        stats = ptqd_record(model)
        if stats is not None:
            eps_hook, var_hook = hooks(stats, schedule)
    ts = timesteps_for(sampler, steps, schedule)
    abar, betas = schedule.alphas_cumprod(), schedule.betas()
    out = []
    bar = tqdm(total=n * len(ts), desc=f"sample {sampler}", unit="img·step",
               disable=not progress, mininterval=5)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(b)]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens])  # [b, *shape]
        for k, t in enumerate(ts):
            if stop_at is not None and t < stop_at:
                break
            if record is not None:
                record(start, t, x)
            eps = eps_of(model, x, t).float()
            if eps_hook is not None:
                eps = eps_hook(t, x, eps)
            if sampler == "ddim":
                a_prev = float(abar[ts[k + 1]]) if k + 1 < len(ts) else 1.0
                x = ddim_step(x, eps, float(abar[t]), a_prev, schedule.clip_sample,
                              schedule.clipped_eps)
            else:
                x, var = ddpm_posterior(x, eps, t, abar, betas, schedule.clip_sample)
                if var_hook is not None:
                    var = var_hook(t, var)
                if t > 0:
                    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
                    x = x + var ** 0.5 * z
            bar.update(b)
        out.append(x)
    bar.close()
    return torch.cat(out)
