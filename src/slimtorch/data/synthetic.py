"""Data-free calibration: synthesise calibration inputs from the float model itself.

``synthesize(model, shape, n, method, seed)`` starts from N(0, 1) noise and optimises it with
Adam so that the model's own statistics look like those of real data:

- ``bn-stats`` (ZeroQ, Cai et al., CVPR 2020, arXiv:2001.00281): at the input of every
  BatchNorm the channel mean/std of each synthetic sample should equal the running mean/std,
  loss = Σ_BN (‖μ̃ − μ‖² + ‖σ̃ − σ‖²) / B over the B samples of a batch, plus the same term
  for the input against N(0, 1) per channel. We follow the public code (``distill_data.py``),
  not the paper's text where they differ: squared norms divided by the batch size; per-sample
  statistics over the spatial positions (``stats="batch"`` matches the batch statistics instead,
  as Genie/DeepInversion do); σ̃ = sqrt(unbiased var + 1e-6); Adam lr 0.5 (the public code;
  METHODS.md quotes 0.1), ReduceLROnPlateau(patience 100), 500 steps per batch of 32.
  ZeroQ reads the statistics after the convolution that precedes a BN, paired by order; we read
  the BN's own input, which is the same tensor without the pairing.
- ``psaq`` (PSAQ-ViT v1, Li et al., ECCV 2022, arXiv:2203.02250): ``data.psaq``.

Where the statistics live is found by running the model, never from names or per-model tables:
one ``TorchFunctionMode`` (``data.tap.Tap``, scoped to each forward) sees every ``batch_norm``
call with its running statistics and every attention output (a matmul with a softmax-derived
operand, or ``scaled_dot_product_attention``). A model with neither is a ``DataFreeError``.

Seeded and deterministic: every random draw uses generators seeded from ``seed``; the model's
parameters, buffers and train/eval mode are left as they were.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import DataFreeError
from .psaq import psaq_batch
from .tap import BNSite, Tap, probe

__all__ = ["synthesize", "resolve", "bn_stats_loss", "channel_stats", "probe", "BNSite"]

METHODS = ("bn-stats", "psaq")
EPS = 1e-6  # ZeroQ's σ = sqrt(var + eps)
# ------------------------------------------------------------------ BN-statistics loss
def channel_stats(x: Tensor, per_sample: bool = True) -> tuple[Tensor, Tensor]:
    """Channel mean and std (sqrt(unbiased var + EPS)) of a BN input ``[B, C, *]``: per sample
    over the positions → ``[B, C]``, or over batch and positions → ``[1, C]``. A ``[B, C]``
    input has one position per sample, so its statistics are over the batch."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)  # [B, C, *] -> [B, C, S]
    if not per_sample or flat.shape[-1] == 1:
        flat = flat.transpose(0, 1).reshape(1, c, -1)  # [C, B*S] as one "sample" [1, C, B*S]
    return flat.mean(-1), (flat.var(-1) + EPS).sqrt()


def bn_stats_loss(sites: list[BNSite], x: Tensor, per_sample: bool = True) -> Tensor:
    """ZeroQ's loss: Σ over BN inputs (and the model input against N(0, 1)) of
    (‖μ̃ − μ‖² + ‖σ̃ − σ‖²) / B, μ̃, σ̃ ``[B, C]`` the statistics of each sample."""
    def term(t: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        mu, sigma = channel_stats(t, per_sample)  # [B, C] each
        return ((mu - mean).pow(2).sum() + (sigma - std).pow(2).sum()) / mu.shape[0]
    c = x.shape[1]
    loss = term(x, x.new_zeros(c), x.new_ones(c))
    for s in sites:
        loss = loss + term(s.x, s.mean, (s.var + EPS).sqrt())
    return loss


@dataclass(frozen=True)
class Settings:
    """Resolved synthesis settings (what ``auto`` became), kept in the artifact metadata."""
    method: str
    steps: int
    lr: float
    batch_size: int
    stats: str = "sample"


DEFAULTS = {"bn-stats": {"steps": 500, "lr": 0.5}, "psaq": {"steps": 1000, "lr": 0.2}}


def resolve(model: nn.Module, shape: tuple[int, ...], method: str = "auto",
            steps: int | str = "auto", lr: float | str = "auto", batch_size: int = 32,
            stats: str = "sample") -> Settings:
    """Pick the method (``auto``: bn-stats when the model runs BatchNorm with running
    statistics, else psaq when it runs attention) and fill its published defaults."""
    if method not in ("auto", *METHODS):
        raise DataFreeError(f"unknown data-free method {method!r}; use one of auto, "
                            f"{', '.join(METHODS)}")
    tap = probe(model.eval(), torch.zeros(2, *shape))
    has_bn, has_attn = bool(tap.bn), bool(tap.attention)
    if not (has_bn or has_attn) or (method == "bn-stats" and not has_bn) or (
            method == "psaq" and not has_attn):
        found = (f"{len(tap.bn)} BatchNorm calls with running statistics and "
                 f"{len(tap.attention)} attention outputs")
        raise DataFreeError(
            f"data-free calibration ({method}) needs statistics to match inside the model: "
            f"bn-stats needs BatchNorm layers with running statistics, psaq needs attention "
            f"(softmax(QKᵀ)·V or scaled_dot_product_attention); this model ran {found}. "
            "Calibrate with real data (drop `calib: {source: data-free}` / --calib data-free), "
            "or pick the method the model supports")
    if method == "auto":
        method = "bn-stats" if has_bn else "psaq"
    d = DEFAULTS[method]
    return Settings(method, d["steps"] if steps == "auto" else int(steps),
                    d["lr"] if lr == "auto" else float(lr), batch_size, stats)


# ------------------------------------------------------------------ the loop
def _bn_batch(model: nn.Module, x0: Tensor, s: Settings, bar) -> tuple[Tensor, float]:
    """ZeroQ on one batch: Adam on the pixels, ReduceLROnPlateau as the public code."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=s.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)
    loss_value = float("nan")
    for _ in range(s.steps):
        with Tap() as tap:
            model(x)
        loss = bn_stats_loss(tap.bn, x, per_sample=s.stats == "sample")
        (x.grad,) = torch.autograd.grad(loss, [x])  # no parameter gradients
        opt.step()
        loss_value = loss.item()
        sched.step(loss_value)
        bar.update(1)
    return x.detach(), loss_value


def synthesize(model: nn.Module, shape: tuple[int, ...] | list[int], n: int = 256, *,
               method: str = "auto", seed: int = 0, steps: int | str = "auto",
               lr: float | str = "auto", batch_size: int = 32, stats: str = "sample",
               progress: bool = False, report: dict | None = None) -> Tensor:
    """``n`` synthetic calibration inputs ``[n, *shape]`` for ``model`` (one sample's shape,
    e.g. ``(1, 28, 28)``), made data-free by ``method`` (auto | bn-stats | psaq). Save the
    tensor (``torch.save``/safetensors) and pass it to ``quantize`` as calibration data to reuse
    it. ``report``, when given, receives the resolved settings and the final loss per batch."""
    if not isinstance(n, int) or n < 1:
        raise DataFreeError(f"the number of synthetic samples must be an int >= 1, got {n!r}")
    if batch_size < 1 or stats not in ("sample", "batch"):
        raise DataFreeError("batch_size must be >= 1 and stats 'sample' or 'batch'")
    shape = tuple(int(v) for v in shape)
    was_training = model.training
    try:
        s = resolve(model, shape, method, steps, lr, batch_size, stats)
        gen = torch.Generator().manual_seed(seed)
        out, losses = [], []
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        with tqdm(total=s.steps * len(sizes), desc=f"data-free {s.method}",
                  disable=not progress, leave=False) as bar:
            for b in sizes:
                x0 = torch.randn(b, *shape, generator=gen)
                if s.method == "bn-stats":
                    x, loss = _bn_batch(model, x0, s, bar)
                else:
                    x, loss = psaq_batch(model, x0, s, gen, bar)
                out.append(x)
                losses.append(round(loss, 6))
    finally:
        model.train(was_training)
    if report is not None:
        report.update({"source": "data-free", "samples": n, "seed": seed,
                       **s.__dict__, "final_loss": losses})
    return torch.cat(out)
