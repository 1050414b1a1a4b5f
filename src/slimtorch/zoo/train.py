"""Train a zoo model on Fashion-MNIST and write its weights and card into ``zoo/weights/``.

Deterministic for a given seed on a given machine: the seed fixes the initialisation, the data
order, the augmentation (random 28x28 crop of the image padded by 2 black pixels, horizontal flip) and
dropout. The recipe follows the usual CIFAR practice: SGD with Nesterov momentum (AdamW for the
ViT), a one-cycle learning-rate schedule (Smith & Topin, 2019), label smoothing 0.1.

Run: ``python -m slimtorch.zoo.train NAME [--epochs E] [--seed S]``. On a shared machine, set
``OMP_WAIT_POLICY=PASSIVE`` in the environment: spinning OpenMP threads slow down several-fold when
other processes compete for the cores.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from slimtorch.data.fashion_mnist import MEAN, STD, load_fashion_mnist, test_set, to_input
from slimtorch.errors import SlimtorchError
from slimtorch.eval.machine import torch_threads
from slimtorch.export.artifact import atomic_path
from slimtorch.zoo.registry import WEIGHTS_DIR, count_params, get_entry


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of one zoo model."""

    epochs: int
    optimizer: str  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    lr: float
    weight_decay: float
    warmup: float = 0.15  # fraction of steps spent ramping the learning rate up
    batch_size: int = 128
    label_smoothing: float = 0.1
    crop_pad: int = 2  # random-crop padding in pixels; 0 keeps only the horizontal flip
    channels_last: bool = True  # faster CPU convolutions


RECIPES = {
    "resnet20": TrainConfig(epochs=7, optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "mobilenetv2": TrainConfig(epochs=10, optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "vit": TrainConfig(epochs=8, optimizer="adamw", lr=1.5e-3, weight_decay=0.05,
                       crop_pad=0, channels_last=False),  # the ViT underfits with crops
}


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop of the black-padded image plus random horizontal flip; x [B, 1, H, W]."""
    b, _, h, w = x.shape
    background = (0.0 - MEAN) / STD  # a black pixel after normalisation
    padded = F.pad(x, (pad, pad, pad, pad), value=background)  # [B, 1, H + 2p, W + 2p]
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=gen)  # each [B, 1]
    rows = dy + torch.arange(h)  # [B, H]
    cols = dx + torch.arange(w)  # [B, W]
    batch = torch.arange(b)[:, None, None]  # [B, 1, 1]
    out = padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # [B, 1, H, W]
    flip = torch.rand(b, generator=gen) < 0.5  # [B]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """The optimiser and its one-cycle schedule (stepped once per batch)."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}.")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                pct_start=cfg.warmup)
    return opt, sched


def train_epoch(model, x, y, opt, sched, cfg: TrainConfig, gen, bar) -> tuple[float, float]:
    """One pass over (x, y) in a seeded random order; returns (mean loss, train top-1 %)."""
    model.train()
    order = torch.randperm(x.shape[0], generator=gen)
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        xb = augment(x[idx], gen, cfg.crop_pad)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = model(xb)
        loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
        bar.update(1)
    return loss_sum / x.shape[0], 100.0 * correct / x.shape[0]


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on (x, y)."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, x.shape[0], batch_size))
    return 100.0 * correct / x.shape[0]


def save_weights(model: nn.Module, card: dict, out_dir: Path) -> None:
    """Write NAME.safetensors (contiguous state_dict) and NAME.json atomically into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    name = card["name"]
    # package data must be readable by all: 0644
    with atomic_path(out_dir / f"{name}.safetensors", 0o644) as tmp:
        save_file(state, tmp)
    with atomic_path(out_dir / f"{name}.json", 0o644) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")


def _fresh_copy(name: str, model: nn.Module) -> nn.Module:
    """The trained weights in a freshly built, contiguous-format model, as users will load them."""
    fresh = get_entry(name).builder()
    fresh.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    return fresh.eval()


def train_zoo_model(name: str, *, epochs: int | None = None, seed: int = 0,
                    data_dir: str | os.PathLike | None = None,
                    out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train zoo model ``name`` on Fashion-MNIST train, test on all 10k test images, save it.

    Returns the model card that was written next to the weights.
    """
    if get_entry(name).task == "diffusion":
        return _train_diffusion(name, epochs=epochs, seed=seed, data_dir=data_dir,
                                out_dir=out_dir, progress=progress)
    entry, cfg = get_entry(name), RECIPES[name]
    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 1:
        raise SlimtorchError(f"epochs must be >= 1, got {epochs}; pass --epochs 1 or more")
    # 2 threads and the seeded global RNG (initialisation, dropout) only while training: the
    # caller's thread count and RNG state are restored
    with torch_threads(2), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, minutes = _train(entry, cfg, name, epochs, seed, data_dir, progress)
    top1 = evaluate(model, *test_set(data_dir))
    card = {
        "name": name, "test_top1": round(top1, 2), "target_top1": entry.target_top1,
        "seed": seed, "epochs": epochs,
        "command": f"slimtorch zoo train {name} --epochs {epochs} --seed {seed}",
        "minutes": round(minutes, 2), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "params": count_params(model),
        "recipe": {k: v for k, v in vars(cfg).items() if k != "epochs"},
    }
    save_weights(model, card, Path(out_dir) if out_dir else WEIGHTS_DIR)
    return card


def _train_diffusion(name: str, *, epochs, seed, data_dir, out_dir, progress) -> dict:
    """zoo:ddpm: its own loss and loop (``zoo.ddpm``); the card's sample metrics are added by
    ``zoo.ddpm.score_card`` (``bench/diffusion.py --card``)."""
    from slimtorch.zoo.ddpm import train_ddpm
    with torch_threads(2), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, card = train_ddpm(epochs=epochs, seed=seed, data_dir=data_dir,
                                 progress=progress)
    save_weights(model, card, Path(out_dir) if out_dir else WEIGHTS_DIR)
    return card


def _train(entry, cfg, name: str, epochs: int, seed: int, data_dir, progress: bool):
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_fashion_mnist("train", data_dir)
    x, y = to_input(images), labels  # [60000, 1, 28, 28], [60000]
    model = entry.builder()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = math.ceil(x.shape[0] / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, epochs * steps)
    start = time.time()
    with tqdm(total=epochs * steps, desc=f"train {name}", disable=not progress,
              mininterval=10) as bar:
        for epoch in range(1, epochs + 1):
            loss, acc = train_epoch(model, x, y, opt, sched, cfg, gen, bar)
            bar.write(f"epoch {epoch}/{epochs}: loss {loss:.4f}, train top-1 {acc:.2f}%, "
                      f"{(time.time() - start) / 60:.1f} min", file=sys.stderr)
    minutes = (time.time() - start) / 60
    return _fresh_copy(name, model), minutes


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train a slimtorch zoo model on Fashion-MNIST.")
    parser.add_argument("name", choices=sorted([*RECIPES, "ddpm"]))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    print(json.dumps(train_zoo_model(args.name, epochs=args.epochs, seed=args.seed,
                                     data_dir=args.data_dir, out_dir=args.out_dir), indent=2))
