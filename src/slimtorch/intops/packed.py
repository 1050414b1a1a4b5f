"""A weight-only quantized Linear on PyTorch's packed low-bit CPU kernels (``PackedLinear``).

The integer weight codes are packed once and the product runs in the kernel, with bfloat16
activations and output (float32 accumulation inside the kernel):

* ≤ 4-bit weights (RTN/GPTQ/AWQ W4, W3, W2) — ``torch.ops.aten._weight_int4pack_mm_for_cpu``,
  groups of 32/64/128/256 input elements, each with a scale and a float offset:
  w = (c − 8)·s_g + o_g for the stored nibble c ∈ [0, 15]. Our codes q ∈ [q_min, q_max] with
  zero point z (w = (q − z)·s) map exactly: c = q + t with t = 8 for signed grids and 0 for
  unsigned ones, o_g = (8 − t − z)·s_g. A per-channel or per-tensor scale is repeated over the
  largest group size that divides the input width.
* 5–8-bit symmetric per-channel weights — ``torch.ops.aten._weight_int8pack_mm``.

Why bf16: these kernels read the weights once per call at 1/8 (int4) or 1/4 (int8) of the
float32 bytes, which is what makes batch-1 decoding faster (memory-bound); their float32
activation path is a slow reference loop. The price is bf16 rounding of each input and output
(relative ≤ 2⁻⁹), far below a 4-bit weight's error; ``bench/llm_speed.py`` measures the
perplexity of the packed model against the fake-quant one.

Constraints of the kernels (checked by ``packed_eligible``): output width a multiple of 16 (int4),
input width a multiple of 32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.granularity import PerChannel, PerGroup
from ..quant.modules import QuantLinear, copy_input_transform, kernel_input
from .linear import keep_weight

INT4_GROUPS = (256, 128, 64, 32)


def _group_size(layer: QuantLinear) -> int | None:
    """The int4 kernel's group size for this layer's weight grid, or None."""
    gran, k = layer.weight_quantizer.spec.gran, layer.in_features
    if isinstance(gran, PerGroup):
        return gran.size if gran.size in INT4_GROUPS else None
    return next((g for g in INT4_GROUPS if k % g == 0), None)


def packed_eligible(layer: nn.Module) -> str | None:
    """None if ``layer`` can run as a PackedLinear, else the reason it cannot."""
    if not isinstance(layer, QuantLinear):
        return "not a QuantLinear"
    wq = layer.weight_quantizer
    if wq is None or not getattr(layer, "frozen", False):
        return "weights not quantized and frozen"
    if layer.input_quantizer is not None:
        return "input quantized (weight-only kernel; W8A8 layers lower to IntLinear)"
    if wq.spec.kind != "uniform":
        return f"{wq.spec.kind} weight grid is not uniform"
    gran = wq.spec.gran
    if isinstance(gran, PerChannel) and gran.axis != 0:
        return "weights not per output channel"
    if layer.in_features % 32:
        return f"input width {layer.in_features} is not a multiple of 32"
    if wq.spec.bits <= 4:
        if layer.out_features % 16:
            return f"output width {layer.out_features} is not a multiple of 16 (int4 kernel)"
        if _group_size(layer) is None:
            return f"group size {gran} is not one of {INT4_GROUPS} (int4 kernel)"
        return None
    if not wq.spec.symmetric or isinstance(gran, PerGroup):
        return "5–8-bit weights must be symmetric per channel or per tensor (int8 kernel)"
    return None


def _per_row(p: Tensor, rows: int) -> Tensor:
    """A weight quantizer's scale or zero point as [O, G'] (G' = 1 per channel or tensor)."""
    return p.float().reshape(1, 1).expand(rows, 1) if p.numel() == 1 else p.float().reshape(rows, -1)


class PackedLinear(nn.Module):
    """Weight-only execution of a frozen QuantLinear on a packed CPU kernel (module docstring)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        reason = packed_eligible(layer)
        if reason is not None:
            raise ValueError(f"cannot pack this layer: {reason}")
        wq = layer.weight_quantizer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = wq.spec.bits
        copy_input_transform(self, layer)  # explicit x/s and x·(A ⊗ B), if any
        bias = layer.bias.detach().float() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        keep_weight(self, layer)
        q = layer.weight_int.to(torch.int32)  # [O, I]
        o, k = q.shape
        if self.bits <= 4:
            self.group = _group_size(layer)
            t = 8 if wq.qmin < 0 else 0
            scale, zp = _per_row(wq.scale, o), _per_row(wq.zero_point, o)  # [O, G']
            n_groups = k // self.group
            reps = n_groups // scale.shape[1]  # >1 when one scale spans several kernel groups
            scale = scale.repeat_interleave(reps, dim=1)  # [O, K/g]
            zp = zp.repeat_interleave(reps, dim=1)
            offset = (8 - t - zp) * scale
            self.register_buffer("w_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                (q + t).contiguous(), 1))
            self.register_buffer("scales_zeros", torch.stack(
                [scale.t(), offset.t()], dim=-1).contiguous().to(torch.bfloat16))  # [K/g, O, 2]
        else:
            self.group = k
            self.register_buffer("w_int8", q.to(torch.int8).contiguous())
            self.register_buffer("w_scale", wq.scale.reshape(-1).float().expand(o)
                                 .contiguous().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        x2 = kernel_input(self, x2)
        xb = x2.to(torch.bfloat16)
        if self.bits <= 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.w_packed, self.group,
                                                           self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.w_int8, self.w_scale)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = (f"int{self.bits} weights packed in int4, groups of {self.group}"
                  if self.bits <= 4 else f"int{self.bits} weights, int8 kernel")
        return f"{self.in_features} -> {self.out_features}, {kernel}, bf16 activations"
