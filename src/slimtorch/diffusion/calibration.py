"""Calibration sets of (x_t, t) pairs from the float model's own sampling trajectory.

The float model samples ``samples`` images from noise with the recipe's sampler (DDIM-50 by
default); every x_t it visits is recorded; a time-step rule then picks which (x_t, t) pairs form
the calibration set (``calib: {source: diffusion, diffusion: {timesteps: ...}}``):

- ``single``: every sample at one time step drawn at random (seeded) from the sampler's steps —
  what generic PTQ does with one model input; the RTN baseline.
- ``ptq4dm`` (Shang et al., CVPR 2023, "Normally Distributed Time-step Calibration"): sample i
  at t_i = clamp(⌊N(μ, σ)·T⌋, 0, T−1), μ = σ = 0.4 (the paper's values) on the T-step training
  schedule, snapped to the nearest step the sampler visits so x_t comes from the trajectory.
  The public code labels the stored x_t with its loop index and feeds respaced indices to an
  un-respaced network; here every pair carries the network time step t it was generated at.
- ``uniform`` (Q-Diffusion, Li et al., ICCV 2023): every ``every``-th sampler step (5 in the
  paper) with ⌈samples / steps kept⌉ samples each, so the set spans the whole trajectory.

``calibrate_time_layers``: layers whose input depends on t alone (the time embedding MLP and
every ResNet block's time projection) are calibrated over all T time steps, since their input
range is known exactly and a calibration set covers only some steps.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DiffusionError
from .schedule import DDPMSchedule, eps_of, sample, timesteps_for


def check_time_model(model: nn.Module) -> None:
    """A DiffusionError unless ``model`` is called as model(x, t)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                  p.VAR_POSITIONAL)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise DiffusionError(
            f"{type(model).__name__}.forward takes {len(positional)} positional argument(s); "
            "a diffusion recipe (calib.source: diffusion) needs a noise predictor called as "
            "model(x_t, t): use a non-diffusion recipe for this model, or wrap it")


def sample_shape(model: nn.Module, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The shape of one sample x: ``shape`` if given, else the model's ``sample_shape``
    attribute, else a diffusers UNet's config (in_channels, sample_size, sample_size) found on
    the model or a submodule; a DiffusionError naming the fix otherwise."""
    if shape is not None:
        return tuple(shape)
    if getattr(model, "sample_shape", None) is not None:
        return tuple(model.sample_shape)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        size, ch = getattr(cfg, "sample_size", None), getattr(cfg, "in_channels", None)
        if isinstance(ch, int) and size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            return (ch, *hw)
    raise DiffusionError(f"cannot tell the sample shape of {type(model).__name__}: set "
                         "`calib: {shape: [C, H, W]}` in the recipe")


def pick_steps(rule: str, visited: list[int], n: int, gen: torch.Generator, *,
               mu: float = 0.4, sigma: float = 0.4, every: int = 5, T: int = 1000
               ) -> list[int]:
    """The sampler step index (into ``visited``, descending network time steps) of each of
    the ``n`` calibration pairs under ``rule``."""
    if rule == "single":
        k = int(torch.randint(0, len(visited), (1,), generator=gen))
        return [k] * n
    if rule == "ptq4dm":
        z = torch.randn(n, generator=gen, dtype=torch.float64) * sigma + mu  # [n]
        t = (z * T).floor().clamp(0, T - 1)  # t = clamp(⌊N(μ, σ)·T⌋, 0, T−1)
        grid = torch.tensor(visited, dtype=torch.float64)  # [S]
        return (t[:, None] - grid[None, :]).abs().argmin(1).tolist()
    if rule == "uniform":
        if every > len(visited):
            raise DiffusionError(f"diffusion.every = {every} is larger than the sampler's "
                                 f"{len(visited)} steps: lower it")
        kept = list(range(0, len(visited), every))
        per = math.ceil(n / len(kept))
        return [kept[i // per] for i in range(n)]
    raise DiffusionError(f"unknown time-step rule {rule!r}: use single, ptq4dm or uniform")


def calibration_set(model: nn.Module, cfg, n: int, batch_size: int, *, seed: int = 0,
                    shape: tuple[int, ...] | None = None, progress: bool = False,
                    report: dict | None = None) -> list[tuple[Tensor, Tensor]]:
    """``n`` (x_t [b, *shape], t [b]) pairs in batches of ``batch_size`` from the float
    model's trajectory, chosen by ``cfg.timesteps`` (a ``recipe.DiffusionCalib``)."""
    check_time_model(model)
    shape = sample_shape(model, shape)
    schedule = DDPMSchedule(num_train_timesteps=cfg.num_train_timesteps)
    visited = timesteps_for(cfg.sampler, cfg.steps, schedule)
    gen = torch.Generator().manual_seed(seed)
    chosen = pick_steps(cfg.timesteps, visited, n, gen, mu=cfg.mu, sigma=cfg.sigma,
                        every=cfg.every, T=schedule.num_train_timesteps)
    order = torch.randperm(n, generator=gen).tolist()  # which trajectory gives pair i
    want: dict[tuple[int, int], int] = {(order[i], visited[k]): i for i, k in enumerate(chosen)}
    xs: list[Tensor | None] = [None] * n

    def record(start: int, t: int, x: Tensor) -> None:
        for j in range(x.shape[0]):
            i = want.get((start + j, t))
            if i is not None:
                xs[i] = x[j].clone()

    last = min(visited[k] for k in chosen)  # no need to sample past the lowest chosen t
    was = model.training
    model.eval()
    try:
        sample(model, n, sampler=cfg.sampler, steps=cfg.steps, seed=seed + 17, shape=shape,
               batch_size=max(batch_size, 100), schedule=schedule, record=record,
               progress=progress, stop_at=last)
    finally:
        model.train(was)
    x = torch.stack(xs)  # [n, *shape]
    t = torch.tensor([visited[k] for k in chosen], dtype=torch.long)  # [n]
    if report is not None:
        report.update({"source": "diffusion", "timesteps": cfg.timesteps, "samples": n,
                       "sampler": cfg.sampler, "sampler_steps": len(visited),
                       "distinct_t": len(set(t.tolist())), "t_min": int(t.min()),
                       "t_max": int(t.max()), "t_mean": round(float(t.float().mean()), 1)})
    return [(x[i:i + batch_size], t[i:i + batch_size]) for i in range(0, n, batch_size)]


def time_only_layers(graph) -> list[str]:
    """Quantized layers whose input depends on the time-step input (the model's second input)
    and on nothing else."""
    inputs = [n.idx for n in graph.nodes if n.kind == "input"]
    if len(inputs) < 2:
        return []
    x_dep = set()
    for n in graph.nodes:  # nodes are in execution order: one pass propagates
        if n.idx == inputs[0] or any(i in x_dep for i in n.inputs):
            x_dep.add(n.idx)
    layer_in = {l["node"]: l["fqn"] for l in graph.layers}
    return [fqn for node, fqn in layer_in.items()
            if graph.nodes[node].inputs and graph.nodes[node].inputs[0] not in x_dep
            and graph.nodes[graph.nodes[node].inputs[0]].dynamic]


@torch.no_grad()
def calibrate_time_layers(model: nn.Module, graph, example: Any, T: int) -> list[str]:
    """Re-observe the input quantizers of the t-only layers over t = 0 … T−1 (one sample each;
    x is the example's first sample, irrelevant to them). Returns those layers."""
    from ..quant.prepare import activation_quantizers
    from ..quant.quantizer import Mode
    names = time_only_layers(graph)
    mods = [model.get_submodule(f) for f in names]
    quants = [q for m in mods for q in activation_quantizers(m)]
    if not quants:
        return []
    x = example[0][:1].expand(T, *example[0].shape[1:])  # [T, *shape]
    t = torch.arange(T)  # [T]
    for q in quants:
        q.mode = Mode.OBSERVE
    for i in range(0, T, 250):
        eps_of(model, x[i:i + 250], t[i:i + 250])
    for q in quants:
        q.finish_observe()
    return names
