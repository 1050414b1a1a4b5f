"""Quantizer families selected by ``QuantSpec.kind`` — the one place a spec becomes a module.

``uniform`` → ``Quantizer``; ``log2sqrt2`` → ``Log2Sqrt2Quantizer`` (RepQ-ViT, post-softmax);
``log2`` → ``Log2Quantizer`` (Agile-Quant / FQ-ViT, post-softmax: x̂ = 2^−k);
``twin_uniform`` → ``TwinUniformQuantizer`` (PTQ4ViT, post-softmax / post-GELU);
``reparam_uniform`` → ``ReparamQuantizer`` (RepQ-ViT's x/r − b on a post-LN input whose
LayerNorm cannot absorb it). The plan stores
the spec (with its kind), so ``load`` rebuilds the same class and the buffers restore its state.
"""
from __future__ import annotations

from .log2 import Log2Quantizer, Log2Sqrt2Quantizer
from .quantizer import Quantizer
from .reparam import ReparamQuantizer
from .spec import QuantSpec
from .twin import TwinUniformQuantizer

QUANTIZER_KINDS: dict[str, type[Quantizer]] = {
    "uniform": Quantizer, "log2sqrt2": Log2Sqrt2Quantizer, "log2": Log2Quantizer, "twin_uniform": TwinUniformQuantizer,
    "reparam_uniform": ReparamQuantizer}


def make_quantizer(spec: QuantSpec, **kwargs) -> Quantizer:
    return QUANTIZER_KINDS[spec.kind](spec, **kwargs)
