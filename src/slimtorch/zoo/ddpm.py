"""zoo:ddpm — a small diffusers ``UNet2DModel`` noise predictor for Fashion-MNIST, and its
training script (DDPM ε-prediction loss, Ho et al. 2020, 1000-step linear schedule).

UNet: channels 16/32/64 at 28/14/7 pixels, two ResNet blocks per level, self-attention only at
7×7, GroupNorm(8); ~0.99 M parameters. Images are scaled to [−1, 1]. Training: AdamW (lr 1e-3,
5 % linear warm-up then cosine decay, weight decay 0), batch 128, random horizontal flips, an
EMA of the weights (decay 0.995 with warm-up) is what ships. Built from its config only (never
``from_pretrained``). Run: ``slimtorch zoo train ddpm [--epochs E] [--seed S]``.
"""
from __future__ import annotations

import datetime
import math
import sys
import time

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import SlimtorchError

UNET_CONFIG = dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                   block_out_channels=(16, 32, 64),
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=32)
EPOCHS, LR, BATCH, EMA_DECAY, WARMUP = 5, 1e-3, 128, 0.995, 0.05


class DDPMUNet(nn.Module):
    """ε-prediction network: forward(x [B, 1, 28, 28], t [B] int) -> ε̂ [B, 1, 28, 28]."""

    def __init__(self):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise SlimtorchError("zoo:ddpm needs diffusers: pip install -e '.[diffusion]'"
                                 ) from None
        self.unet = UNet2DModel(**UNET_CONFIG)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def to_unit(images: Tensor) -> Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [−1, 1]."""
    return images.to(torch.float32).div(127.5).sub(1.0).unsqueeze(1)


def _ema_with_warmup():
    """EMA update with decay min(EMA_DECAY, (1 + n)/(10 + n)) at update n (the usual warm-up:
    a plain 0.999 EMA over a few thousand steps would still hold ~10 % of the random init)."""
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        decay = min(EMA_DECAY, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - decay)
    return update


def train_ddpm(*, epochs: int | None = None, seed: int = 0, data_dir=None,
               progress: bool = True) -> tuple[nn.Module, dict]:
    """Train zoo:ddpm on the 60k Fashion-MNIST training images; returns (EMA model, card)."""
    from torch.optim.swa_utils import AveragedModel

    from ..data.fashion_mnist import load_fashion_mnist
    from ..diffusion.schedule import DDPMSchedule

    epochs = EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise SlimtorchError(f"epochs must be >= 1, got {epochs}; pass --epochs 1 or more")
    gen = torch.Generator().manual_seed(seed)
    x = to_unit(load_fashion_mnist("train", data_dir)[0])  # [60000, 1, 28, 28]
    schedule = DDPMSchedule()
    model = DDPMUNet().to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=_ema_with_warmup())
    steps = epochs * math.ceil(x.shape[0] / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))))
    start, losses = time.time(), []
    with tqdm(total=steps, desc="train ddpm", disable=not progress, mininterval=10) as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(x.shape[0], generator=gen)
            model.train()
            for i in range(0, x.shape[0], BATCH):
                x0 = x[order[i:i + BATCH]]
                flip = torch.rand(x0.shape[0], generator=gen) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],),
                                  generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                xt = schedule.add_noise(x0, noise, t).contiguous(
                    memory_format=torch.channels_last)
                loss = (model(xt, t) - noise).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema.update_parameters(model)
                losses.append(loss.item())
                bar.update(1)
            bar.write(f"epoch {epoch}/{epochs}: loss {sum(losses[-469:]) / len(losses[-469:]):.4f}"
                      f", {(time.time() - start) / 60:.1f} min", file=sys.stderr)
    minutes = (time.time() - start) / 60
    fresh = DDPMUNet()
    fresh.load_state_dict({k: v.contiguous() for k, v in ema.module.state_dict().items()})
    card = {"name": "ddpm", "task": "diffusion", "seed": seed, "epochs": epochs,
            "command": f"slimtorch zoo train ddpm --epochs {epochs} --seed {seed}",
            "minutes": round(minutes, 2), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "params": sum(p.numel() for p in fresh.parameters()),
            "final_loss": round(sum(losses[-100:]) / 100, 5),
            "recipe": {"optimizer": "adamw", "lr": LR, "batch_size": BATCH,
                       "ema_decay": EMA_DECAY, "warmup": WARMUP, "schedule": "cosine",
                       "timesteps": schedule.num_train_timesteps, "betas": "linear 1e-4..0.02",
                       "augment": "horizontal flip"},
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()}}
    return fresh.eval(), card
