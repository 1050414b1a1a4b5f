"""A Linear layer executed in integers: int8 activations × int8 weights → int32, then either
dequantised with one float multiply per output channel or requantised onto an output grid with
a dyadic multiplier (``dyadic.requantize``).

With input codes q_x ∈ [q_min, q_max] (zero point z_x) and symmetric weight codes q_w:

    y_o = s_x·s_w,o · Σ_i (q_x,i − z_x)·q_w,oi + b_o

Unsigned activation codes are shifted into int8 (a = q_x − 128) so ``torch._int_mm`` can take
them: Σ (q_x − z_x)·q_w = Σ a·q_w + (128 − z_x)·Σ_i q_w,oi, the last term precomputed per
output channel. With an output grid (s_y, z_y) the bias joins the accumulator as
b_int = round(b / (s_x·s_w)) and

    q_y = clip(round(acc · m·2^−k) + z_y),   m·2^−k ≈ s_x·s_w,o / s_y

which differs from fake quantization of the float output by at most one output step.
A *dynamic* symmetric input (``per_token`` or dynamic ``per_tensor``, SmoothQuant's W8A8 for
LLMs) takes s_x from each row (or the whole input) at run time, exactly as the fake quantizer
does (``Quantizer.dynamic_params``), and y = acc · s_x,row · s_w,o + b. An explicit
per-channel input scale (SmoothQuant/AWQ where nothing could absorb 1/s) divides x first.
Rows are processed in chunks of ~2 MB so the int32/float intermediates stay in cache (and below
the allocator's mmap threshold: fresh page-faulting buffers cost more than the product itself).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.granularity import PerChannel, PerTensor
from ..quant.modules import QuantLinear, copy_input_transform, kernel_input
from ..quant.quantizer import Quantizer
from .dyadic import dyadic, requantize
from .matmul import int8_matmul

CHUNK_ELEMENTS = 1 << 19  # ~2 MB of float32 per chunk of output rows


def keep_weight(new: nn.Module, layer: nn.Module) -> None:
    """``new.weight``: the frozen layer's (dequantised) weight, not saved with the state — model
    code outside the layer reads it (T5 casts its input to ``wo.weight.dtype``; other code may
    use the values), and it must stay exactly what the fake-quant model holds."""
    new.register_buffer("weight", layer.weight.detach(), persistent=False)


def int8_eligible(layer: nn.Module) -> str | None:
    """None if ``layer`` can run as an IntLinear, else the reason it cannot."""
    if not isinstance(layer, QuantLinear):
        return "not a QuantLinear"
    wq, xq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or not getattr(layer, "frozen", False):
        return "weights not quantized and frozen"
    if xq is None:
        return "input not quantized"
    if xq.spec.dynamic:
        if not xq.spec.symmetric:
            return "dynamic asymmetric input (only symmetric dynamic inputs are lowered)"
    elif not isinstance(xq.spec.gran, PerTensor):
        return "input not quantized per tensor"
    if xq.spec.kind != "uniform" or wq.spec.kind != "uniform":
        return f"{xq.spec.kind}/{wq.spec.kind} grid is not uniform"
    if not (wq.spec.symmetric and wq.qmin >= -128 and wq.qmax <= 127):
        return "weights not symmetric int8"
    if not isinstance(wq.spec.gran, (PerTensor, PerChannel)) or (
            isinstance(wq.spec.gran, PerChannel) and wq.spec.gran.axis != 0):
        return "weights not per tensor or per output channel"
    if not ((xq.qmin >= 0 and xq.qmax <= 255) or (xq.qmin >= -128 and xq.qmax <= 127)):
        return "input grid wider than 8 bits"
    return None


class IntLinear(nn.Module):
    """Integer execution of a frozen QuantLinear (see module docstring)."""

    def __init__(self, layer: QuantLinear, out_quantizer: Quantizer | None = None):
        super().__init__()
        reason = int8_eligible(layer)
        if reason is not None:
            raise ValueError(f"cannot lower this layer to int8: {reason}")
        xq, wq = layer.input_quantizer, layer.weight_quantizer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        copy_input_transform(self, layer)  # explicit x/s and x·(A ⊗ B), if any
        self.dynamic = xq if xq.spec.dynamic else None  # computes each input's own scale
        if self.dynamic is not None and out_quantizer is not None:
            raise ValueError("a dynamic input has no fixed scale to requantise the output by")
        self.x_scale, self.x_zp = ((1.0, 0.0) if self.dynamic is not None
                                   else (float(xq.scale), float(xq.zero_point)))
        self.x_qmin, self.x_qmax = xq.qmin, xq.qmax
        self.shift = 128 if xq.qmin >= 0 else 0  # unsigned codes -> int8
        w = layer.weight_int.to(torch.int8)  # [O, I]
        self.register_buffer("w_t", w.t().contiguous())  # [I, O]
        w_sum = w.to(torch.int32).sum(1)  # [O]
        self.register_buffer("offset", ((self.shift - self.x_zp) * w_sum).to(torch.int32))
        self.has_offset = bool(self.offset.any())  # zero for symmetric int8 inputs
        w_scale = wq.scale.reshape(-1).double().expand(self.out_features)  # [O]
        self.register_buffer("mult", (self.x_scale * w_scale).float())  # s_x·s_w,o
        bias = layer.bias.detach().float() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        keep_weight(self, layer)
        self.out = None
        if out_quantizer is not None:
            self._set_output_grid(out_quantizer, self.x_scale * w_scale, bias)

    def _set_output_grid(self, q: Quantizer, mult: Tensor, bias: Tensor | None) -> None:
        if not isinstance(q.spec.gran, PerTensor):
            raise ValueError("the output grid must be per tensor")
        s_y = float(q.scale)
        m, k = dyadic(mult / s_y)
        b_int = (torch.round(bias.double() / mult).to(torch.int64) if bias is not None
                 else torch.zeros(self.out_features, dtype=torch.int64))
        self.register_buffer("req_m", m)
        self.register_buffer("req_k", k)
        self.register_buffer("bias_int", b_int)
        self.out = (s_y, int(q.zero_point), q.qmin, q.qmax)

    def quantize_input(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """int8 codes (shifted by −128 when the grid is unsigned) of x: [..., I] -> [M, I]
        (``scale``: a dynamic input's own scale, [M, 1] or scalar)."""
        s = self.x_scale if scale is None else scale
        q = torch.div(x.reshape(-1, self.in_features), s).round_()  # as Quantizer: x / s
        if self.x_zp:
            q.add_(self.x_zp)
        q.clamp_(self.x_qmin, self.x_qmax)
        return (q.sub_(self.shift) if self.shift else q).to(torch.int8)

    def accumulate(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """int32 Σ_i (q_x,i − z_x)·q_w,oi: [M, O]."""
        acc = int8_matmul(self.quantize_input(x, scale), self.w_t)
        return acc.add_(self.offset) if self.has_offset else acc

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, I]
        x2 = kernel_input(self, x2)
        # a dynamic per-tensor range is over the whole input, not one chunk of it
        whole = (self.dynamic.dynamic_params(x2)[0] if self.dynamic is not None
                 and isinstance(self.dynamic.spec.gran, PerTensor) else None)
        out = x2.new_empty(x2.shape[0], self.out_features)  # [M, O]
        rows = max(64, CHUNK_ELEMENTS // max(self.in_features, self.out_features))
        for start in range(0, x2.shape[0], rows):  # row chunks stay in cache
            self._rows(x2[start: start + rows], out[start: start + rows], whole)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _rows(self, x: Tensor, out: Tensor, s_x: Tensor | None = None) -> None:
        """Integer product of a row chunk x [m, I], written to out [m, O] (``s_x``: a dynamic
        per-tensor input's scale, taken over the whole input)."""
        if self.dynamic is not None:  # y = acc·s_x·s_w + b, s_x per row or per input
            if s_x is None:  # per token: each row's own scale [m, 1]
                s_x = self.dynamic.dynamic_params(x)[0]
            torch.mul(self.accumulate(x, s_x), self.mult, out=out)
            out.mul_(s_x)
            if self.bias is not None:
                out.add_(self.bias)
            return
        acc = self.accumulate(x)  # [m, O] int32
        if self.out is None:  # y = acc·(s_x·s_w) + b
            torch.mul(acc, self.mult, out=out)
            if self.bias is not None:
                out.add_(self.bias)
            return
        s_y, z_y, qmin, qmax = self.out
        codes = requantize(acc.to(torch.int64) + self.bias_int, self.req_m, self.req_k, z_y,
                           qmin, qmax)
        torch.mul(codes - z_y, s_y, out=out)

    def extra_repr(self) -> str:
        if self.dynamic is not None:
            return (f"{self.in_features} -> {self.out_features}, int8×int8→int32, dynamic "
                    f"{self.dynamic.spec.granularity} input scale, float output")
        grid = "float output" if self.out is None else f"requantised to s={self.out[0]:.3g}"
        return f"{self.in_features} -> {self.out_features}, int8×int8→int32, {grid}"
