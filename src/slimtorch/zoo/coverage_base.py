"""What a coverage architecture is, and the rules that make a random-initialised model realistic.

Random weights are not trained weights; two rules (by parameter, never by class) keep the float
model non-degenerate, as a new user's first try would see it:

* all-zero weights (zero-initialised classifier heads, timm's zero-init of the last norm of a
  residual branch) are re-drawn: Linear/Conv weights trunc-normal(0.02), norm weights 1;
* BatchNorm statistics are set by a few forward passes in train mode on a batch of 16 with
  ``momentum=None`` (a cumulative average), then the model is put in eval mode.

Everything is seeded: the same name gives the same model and inputs every time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..graph.capture import call_model

IMAGE = 64
SEQ, VOCAB = 16, 512
BN_PASSES, BN_BATCH = 3, 16
_NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


@dataclass(frozen=True)
class Arch:
    """One architecture: a seeded builder, a batch maker and which output tensor to compare."""

    name: str
    family: str                                  # torchvision | timm | transformers
    kind: str                                    # cnn | mobile | vit | hybrid | mlp | text | audio
    build: Callable[[], nn.Module]               # the float model, in eval mode
    batch: Callable[[int, int], Any]             # (seed, n) -> one model input item
    output: Callable[[Any], Tensor] = field(default=lambda out: out)  # model output -> tensor
    slow: bool = False                           # heavy: the test suite marks it slow


def images(seed: int, n: int, size: int = IMAGE) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def redraw_zero_weights(model: nn.Module) -> None:
    """All-zero Linear/Conv weights -> trunc-normal(0.02); all-zero norm weights -> 1."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.any():
            continue
        if isinstance(m, _NORMS):
            w.fill_(1.0)
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.trunc_normal_(w, std=0.02)


@torch.no_grad()
def set_bn_statistics(model: nn.Module, batch: Callable[[int, int], Any]) -> None:
    """BatchNorm running statistics from BN_PASSES train-mode passes on BN_BATCH inputs."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the passes
    model.train()
    for i in range(BN_PASSES):
        call_model(model, batch(10_000 + i, BN_BATCH))
    model.eval()


def realistic(model: nn.Module, batch: Callable[[int, int], Any]) -> nn.Module:
    redraw_zero_weights(model)
    set_bn_statistics(model, batch)
    return model.eval()


def seeded(make: Callable[[], nn.Module], batch) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            return realistic(make(), batch)
        finally:
            torch.random.set_rng_state(state)  # the caller's RNG is left as it was
    return build


def torchvision_arch(name: str, kind: str, slow: bool = False, **kwargs) -> Arch:
    def make():
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return Arch(f"tv/{name}", "torchvision", kind, seeded(make, images), images,
                _logits, slow)


def timm_arch(name: str, kind: str, slow: bool = False, **kwargs) -> Arch:
    def make():
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    return Arch(f"timm/{name}", "timm", kind, seeded(make, images), images, _logits, slow)


def _logits(out: Any) -> Tensor:
    """The tensor a classifier returns (GoogLeNet/Inception return named tuples in train)."""
    return out if isinstance(out, Tensor) else out[0]


def calib_and_eval(arch: Arch, batches: int = 2, batch_size: int = 4, eval_n: int = 16
                   ) -> tuple[list, Any]:
    """Seeded calibration items and one evaluation item (disjoint seeds)."""
    return [arch.batch(100 + i, batch_size) for i in range(batches)], arch.batch(200, eval_n)


@torch.no_grad()
def output_of(arch: Arch, model: nn.Module, item: Any) -> Tensor:
    return arch.output(call_model(model, item)).float()


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two outputs, flattened."""
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()
