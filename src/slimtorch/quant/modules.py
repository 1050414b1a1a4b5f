"""Quantized layers: a registered float layer type plus a weight and an input quantizer.

``register_qmodule(nn.Linear)`` maps a float layer type to its quantized twin; ``from_module``
builds the twin sharing the float module's parameters. Activations are quantized at the layer
input (that is where an int8 kernel reads them), weights per the recipe. ``freeze()`` stores the
integer weight codes (``weight_int``) and replaces ``weight`` by their exact dequantisation, so
a frozen layer costs the same as a float one in fake-quant evaluation and reloads bit-exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kinds import make_quantizer
from .quantizer import Quantizer
from .spec import QuantSpec

QMODULES: dict[type[nn.Module], type[nn.Module]] = {}


def register_qmodule(float_cls: type[nn.Module]):
    def deco(cls):
        QMODULES[float_cls] = cls
        return cls
    return deco


def qmodule_class(module: nn.Module) -> type[nn.Module] | None:
    for float_cls, q_cls in QMODULES.items():
        if isinstance(module, float_cls) and not isinstance(module, QuantLayerMixin):
            return q_cls
    return None


class QuantLayerMixin:
    """Shared quantization state of Conv/Linear twins."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def _init_quant(self, w_spec: QuantSpec | None, a_spec: QuantSpec | None, seed: int,
                    max_samples: int) -> None:
        self.weight_quantizer = make_quantizer(w_spec, seed=seed) if w_spec else None
        self.input_quantizer = (make_quantizer(a_spec, seed=seed + 1, max_samples=max_samples)
                                if a_spec else None)
        self.frozen = False

    def calibrate_weight(self) -> None:
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate(self.weight)

    def quantized_weight(self) -> Tensor:
        if self.frozen or self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    @torch.no_grad()
    def freeze(self) -> None:
        """Store integer weight codes; ``weight`` becomes their exact dequantisation."""
        if self.weight_quantizer is None or self.frozen:
            return
        q = self.weight_quantizer.quantize_int(self.weight)
        self.set_weight_int(q)

    @torch.no_grad()
    def set_weight_int(self, q: Tensor) -> None:
        self.register_buffer("weight_int", q.to(torch.int16), persistent=False)
        w = self.weight_quantizer.dequantize_int(q)
        self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
        self.frozen = True

    @classmethod
    def from_module(cls, module: nn.Module, w_spec, a_spec, *, seed=0, max_samples=1 << 18):
        new = cls._empty_like(module)
        new.weight = module.weight
        if hasattr(module, "bias"):
            new.bias = module.bias
        new._init_quant(w_spec, a_spec, seed, max_samples)
        return new


@register_qmodule(nn.Linear)
class QuantLinear(QuantLayerMixin, nn.Linear):
    @staticmethod
    def _empty_like(m: nn.Linear) -> "QuantLinear":
        return QuantLinear(m.in_features, m.out_features, bias=m.bias is not None,
                           device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConvNd(QuantLayerMixin):
    @classmethod
    def _empty_like(cls, m):
        return cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                   padding=m.padding, dilation=m.dilation, groups=m.groups,
                   bias=m.bias is not None, padding_mode=m.padding_mode, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


@register_qmodule(nn.Conv2d)
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


@register_qmodule(nn.Conv1d)
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


@register_qmodule(nn.Embedding)
class QuantEmbedding(QuantLayerMixin, nn.Embedding):
    """Weight-only: one scale per embedding row; the input is indices, never quantized."""

    @staticmethod
    def _empty_like(m: nn.Embedding) -> "QuantEmbedding":
        return QuantEmbedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx,
                              max_norm=m.max_norm, norm_type=m.norm_type,
                              scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                              device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)
