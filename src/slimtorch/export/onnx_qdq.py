"""Export mode: every calibrated quantizer becomes ONNX QuantizeLinear/DequantizeLinear.

While ``qdq_export_mode(model)`` is active (used only around ``torch.onnx.export``):

- an activation quantizer computes exactly what it computes in PyTorch
  (x̂ = s·(clip(⌊x/s⌉ + z, q_min, q_max) − z)) but exports as ``QuantizeLinear → DequantizeLinear``
  (ONNX: y = saturate(⌊x/s⌉ + z), x̂ = (y − z)·s). Grids narrower than the 8-bit container
  (bits < 8) get a float ``Clip`` to [(q_min − z)·s, (q_max − z)·s] before the Q; since the
  bounds are grid points, clip-then-round equals round-then-clip, so the numerics are the same;
- a frozen layer's weight exports as its integer codes (``weight_int``) stored as an int8/uint8
  constant followed by ``DequantizeLinear`` (per tensor, per channel on axis 0, or per group as a
  per-row DQ of the [O·G, size] codes and a ``Reshape``): the ONNX file holds the same integers
  the artifact holds, and DQ(codes) is the frozen ``weight`` bit for bit.

Everything is patched on the instances and restored on exit; the model is not copied.
A quantizer with no QDQ form (per-group activations; the non-uniform kinds log√2, twin-uniform and
the reparameterising ``reparam_uniform``, whose grids QuantizeLinear cannot express) keeps its
float arithmetic, so onnxruntime computes what PyTorch computes, and is listed in
``ExportState.float_quantizers``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..quant.granularity import PerChannel, PerGroup, PerTensor
from ..quant.modules import QuantLayerMixin
from ..quant.prepare import activation_quantizers, quant_layers
from ..quant.quantizer import Mode, Quantizer, fake_quant


def container(qmin: int, qmax: int) -> torch.dtype:
    """The 8-bit ONNX container of an integer grid: uint8 for [0, ≤255], int8 for [≥−128, ≤127]."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    raise ValueError(f"grid [{qmin}, {qmax}] does not fit an 8-bit ONNX container")


class _ActQDQ(torch.autograd.Function):
    """Forward: the engine's fake quant. Symbolic: [Clip →] QuantizeLinear → DequantizeLinear.

    ``s``/``z``: the ONNX scale (float32) and zero point (uint8/int8), 0-d or 1-D along
    ``axis``; ``lo``/``hi``: the grid's end points in float, used when ``narrow``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, s: Tensor, z: Tensor, lo: Tensor,
                hi: Tensor, qmin: int, qmax: int, axis: int, narrow: bool) -> Tensor:
        return fake_quant(x, scale, zp, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zp, s, z, lo, hi, qmin: int, qmax: int, axis: int,
                 narrow: bool):
        kw = {} if axis < 0 else {"axis_i": axis}
        if narrow:  # clip-then-round == round-then-clip: the bounds are grid points
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z, **kw), s, z, **kw)


def _act_args(q: Quantizer) -> tuple:
    """Arguments of ``_ActQDQ.apply`` (after x) for an activation quantizer."""
    dtype = container(q.qmin, q.qmax)
    axis = q.spec.gran.axis if isinstance(q.spec.gran, PerChannel) else -1
    shape = (-1,) if axis >= 0 else ()
    s = q.scale.detach().float().reshape(shape)
    z = q.zero_point.detach().round().reshape(shape)
    info = torch.iinfo(dtype)
    narrow = (q.qmin, q.qmax) != (info.min, info.max)
    lo = ((q.qmin - z) * s).reshape(-1)[0] if narrow else s.new_zeros(())
    hi = ((q.qmax - z) * s).reshape(-1)[0] if narrow else s.new_zeros(())
    return (q.scale, q.zero_point, s, z.to(dtype), lo, hi, q.qmin, q.qmax, axis, narrow)


class _WeightDQ(torch.autograd.Function):
    """Forward: the frozen (exactly dequantised) weight. Symbolic: DQ(integer codes)."""

    @staticmethod
    def forward(ctx, w: Tensor, codes: Tensor, scale: Tensor, zp: Tensor, axis: int) -> Tensor:
        return w

    @staticmethod
    def symbolic(g, w, codes, scale, zp, axis: int):
        kw = {} if axis < 0 else {"axis_i": axis}
        out = g.op("DequantizeLinear", codes, scale, zp, **kw)
        shape = w.type().sizes()
        if codes.type().sizes() != shape:  # per group: [O·G, size] -> the weight's shape
            out = g.op("Reshape", out, g.op("Constant", value_t=torch.tensor(shape)))
        return out


def _weight_codes(layer: QuantLayerMixin) -> tuple[Tensor, Tensor, Tensor, int]:
    """(codes, scale, zero point, axis) of a frozen layer's weight in ONNX DQ layout."""
    wq = layer.weight_quantizer
    dtype = container(wq.qmin, wq.qmax)
    codes = layer.weight_int
    scale, zp = wq.scale.detach().float(), wq.zero_point.detach()
    g = wq.spec.gran
    if isinstance(g, PerTensor):
        return codes.to(dtype), scale.reshape(()), zp.reshape(()).round().to(dtype), -1
    if isinstance(g, PerChannel):
        return (codes.to(dtype), scale.reshape(-1), zp.reshape(-1).round().to(dtype), g.axis)
    rows = codes.reshape(-1, g.size)  # [O·G, size]: one scale per row
    return rows.to(dtype), scale.reshape(-1), zp.reshape(-1).round().to(dtype), 0


@dataclass
class ExportState:
    """What the export mode did: counts of quantizers/weights per form, and the exceptions."""

    act_qdq: int = 0
    weight_dq: int = 0
    float_quantizers: list[str] = field(default_factory=list)
    float_weights: list[str] = field(default_factory=list)


def _qdq_supported(q: Quantizer) -> bool:
    """Uniform calibrated grids only: per-tensor at any width; per-channel at 8 bits (a
    per-channel Clip is not exact). A dynamic (run-time) range has no constant scale."""
    if q.spec.kind != "uniform" or q.spec.dynamic or isinstance(q.spec.gran, PerGroup):
        return False
    return q.spec.bits == 8 or isinstance(q.spec.gran, PerTensor)


def _patch_quantizer(q: Quantizer) -> None:
    args = _act_args(q)
    q.forward = lambda x: _ActQDQ.apply(x, *args)  # instance attribute shadows the method


def _patch_weight(layer: QuantLayerMixin) -> None:
    codes, scale, zp, axis = _weight_codes(layer)
    layer.quantized_weight = lambda: _WeightDQ.apply(layer.weight, codes, scale, zp, axis)


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module):
    """Patch every calibrated quantizer and frozen weight of ``model`` for QDQ export."""
    state, patched = ExportState(), []
    names = {id(m): n for n, m in model.named_modules()}
    try:
        for q in activation_quantizers(model):  # each shared quantizer once
            if q.mode is not Mode.QUANT:
                continue
            if _qdq_supported(q):
                _patch_quantizer(q)
                patched.append((q, "forward"))
                state.act_qdq += 1
            else:
                state.float_quantizers.append(names[id(q)])
        for name, layer in quant_layers(model):
            if layer.weight_quantizer is None:
                continue
            if layer.frozen:
                _patch_weight(layer)
                patched.append((layer, "quantized_weight"))
                state.weight_dq += 1
            else:
                state.float_weights.append(name)
        yield state
    finally:
        for mod, attr in patched:
            mod.__dict__.pop(attr, None)
