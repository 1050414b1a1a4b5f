"""Input quantizer carrying RepQ-ViT's scale reparameterisation (Li et al., ICCV 2023) for a
LayerNorm output that cannot absorb it (spec kind ``reparam_uniform``).

RepQ-ViT folds x' = x/r − b into the LayerNorm affine. When that LayerNorm output also feeds
something other than the Linear layers (post-LN BERT: the residual add), the fold would change
that consumer. The same map is then applied by the Linear's input quantizer, *always* — also
with the quantizer off — because the layer's weight has absorbed r (W ← W·r, bias ← bias + W·b):

    x' = x / r − b                  per channel c of the last dim
    x̂' = Δ̄·(clip(⌊x'/Δ̄⌉ + z̄, 0, 2^b − 1) − z̄)      one per-tensor grid (Δ̄, z̄)

so the float function is unchanged and the quantized one equals per-channel quantization of x
on (Δ_c, z_c) followed by the reparameterised Linear: with integer z_c and z̄,
⌊x'/Δ̄⌉ + z̄ = ⌊x/Δ_c⌉ + z_c. In deployment the affine is part of the quantize op (a
per-channel multiplier/offset instead of a scalar one), and the integer matmul still reads one
per-tensor scale. State: ``in_scale`` (r) and ``in_shift`` (b), saved with the artifact.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .quantizer import Quantizer


class ReparamQuantizer(Quantizer):
    """Per-channel affine x/r − b, then the uniform per-tensor quantizer of its spec."""

    SHAPED_ON_LOAD = Quantizer.SHAPED_ON_LOAD + ("in_scale", "in_shift")

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("in_shift", torch.zeros(()))

    @torch.no_grad()
    def set_affine(self, r: Tensor, b: Tensor) -> None:
        self.in_scale = r.detach().reshape(-1).clone()  # [C]
        self.in_shift = b.detach().reshape(-1).clone()  # [C]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x / self.in_scale - self.in_shift)  # [..., C] over the last dim

    def extra_repr(self) -> str:
        return f"reparam x/r - b ({self.in_scale.numel()} channels), " + super().extra_repr()
