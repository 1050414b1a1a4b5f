"""PSAQ-ViT v1 (Li et al., "Patch Similarity Aware Data-Free Quantization for Vision
Transformers", ECCV 2022, arXiv:2203.02250): synthetic images whose patch features are diverse.

For every attention output ``[B, H, N, Dh]`` (softmax(QKᵀ)·V, found by ``data.tap.Tap``),
average the heads, drop the class token, take the cosine similarity of every pair of patches
(``[B, N-1, N-1]``), estimate its density per sample with a Gaussian KDE (bandwidth 0.01) on 10
points between the batch's min and max similarity, and take the differential entropy
∫ −p log p (trapezoid rule, p + 1e-4). The loss is −Σ_blocks H + CE(output, random targets)
+ 0.05 · ‖TV(x) − τ‖, minimised with Adam.

We follow the public v1 code (``zkkli/PSAQ-ViT``, ``generate_data.py``), since v2's code is not
public: N(0, 1) init, Adam lr 0.2 betas (0.5, 0.9), two rounds of 500 steps (``steps`` split in
two) with a cosine schedule after 100 warm-up steps, random roll jitter and horizontal flips.
Adapted to the input size, and said so: the jitter limits (15 then 30 px at 224 px) scale with
the image side, and the TV target τ ~ U(2500, 3000) (set for 32 × 3 × 224² inputs) scales with
√(elements of the batch), since each TV term is an L2 norm over the batch. The public code also
clips pixels to the valid range of ImageNet normalisation; the model does not tell us its
normalisation, so no clip is applied. The hook point is the code's ``matmul2`` (attn @ v).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tap import Tap

BANDWIDTH = 0.01
GRID = 10          # KDE evaluation points
TV_WEIGHT = 0.05
WARMUP = 100


def kde(samples: Tensor, points: Tensor, bandwidth: float = BANDWIDTH) -> Tensor:
    """Gaussian KDE: ``samples [B, M]`` evaluated at ``points [B, G]`` → density ``[B, G]``."""
    diff = points.unsqueeze(-1) - samples.unsqueeze(1)  # [B, G, 1] - [B, 1, M] -> [B, G, M]
    norm = 1.0 / math.sqrt(2 * math.pi * bandwidth ** 2)
    return (norm * torch.exp(-diff.pow(2) / (2 * bandwidth ** 2))).mean(-1)


def patch_similarity_entropy(attention: Tensor) -> Tensor:
    """Mean over the batch of the differential entropy of the patch-similarity density of one
    attention output ``[B, H, N, Dh]`` (token 0, the class token, dropped)."""
    feats = attention.mean(1)[:, 1:]  # [B, H, N, Dh] -> [B, N-1, Dh]
    sims = F.cosine_similarity(feats.unsqueeze(1), feats.unsqueeze(2), dim=-1)  # [B, N-1, N-1]
    sims = sims.reshape(sims.shape[0], -1)  # [B, (N-1)²]
    lo, hi = sims.min().item(), sims.max().item()  # grid ends are constants, as in the code
    grid = torch.linspace(lo, hi, GRID).expand(sims.shape[0], GRID)  # [B, G]
    p = kde(sims, grid) + 1e-4
    return torch.trapezoid(-p * p.log(), grid, dim=-1).mean()


def total_variation(x: Tensor) -> Tensor:
    """Sum of the L2 norms of the horizontal, vertical and both diagonal differences."""
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def _lr(base: float, it: int, steps: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine to zero (the code's lr_cosine_policy)."""
    if it < WARMUP:
        return base * (it + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / max(steps - WARMUP, 1))) * base


def psaq_batch(model: nn.Module, x0: Tensor, s, gen: torch.Generator, bar) -> tuple[Tensor, float]:
    """PSAQ-ViT v1 on one batch; ``s``: ``synthetic.Settings``."""
    rng = random.Random(int(torch.randint(1 << 31, (1,), generator=gen)))
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=s.lr, betas=(0.5, 0.9), eps=1e-8)
    with torch.no_grad():
        classes = model(x0[:1]).shape[-1]
    target = torch.randint(classes, (x.shape[0],), generator=gen)
    side = x.shape[-1]
    tau = rng.uniform(2500, 3000) * math.sqrt(x.numel() / (32 * 3 * 224 * 224))
    rounds = [s.steps // 2, s.steps - s.steps // 2]
    loss_value = float("nan")
    for r, steps in enumerate(rounds):
        lim = max(1, round((15, 30)[r] * side / 224))
        for it in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr(s.lr, it, steps)
            off = rng.randint(-lim, lim)
            xj = torch.roll(x, shifts=(off, off), dims=(-2, -1))
            if rng.random() > 0.5:
                xj = torch.flip(xj, dims=(-1,))
            with Tap() as tap:
                out = model(xj)
            loss = F.cross_entropy(out, target) + TV_WEIGHT * (total_variation(xj) - tau).abs()
            for a in tap.attention:
                loss = loss - patch_similarity_entropy(a)
            (x.grad,) = torch.autograd.grad(loss, [x])
            opt.step()
            loss_value = loss.item()
            bar.update(1)
    return x.detach(), loss_value
