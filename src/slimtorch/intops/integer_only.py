"""Integer-only inference of a transformer (I-ViT, Li & Gu, ICCV 2023): between the input
quantizer and the output dequantizer every tensor is an integer code tensor and every op an
integer kernel — int8 × int8 → int32 matmuls, dyadic requantisation m·2^−k (``dyadic.py``),
Shiftmax, ShiftGELU and I-LayerNorm (``ivit.py``).

The model is read by ``torch.export`` (ATen ops, any batch size), never by module names. Each
value between ops is (codes, scale) with a symmetric per-tensor 8-bit grid whose scale comes
from calibration (max |x| over the calibration batches / 127, as I-ViT's QuantAct with
min/max); weights are symmetric per output channel, biases int32 at s_x·s_w. Where I-ViT puts
a QuantAct is where every op here requantises: after each Linear/Conv, matmul, LayerNorm,
GELU, residual add and concat. Shiftmax's output is its own grid (codes 0..128, scale 1/128);
a multiplication by a constant only rescales (exact); data movement (reshape, permute,
select, expand, ...) moves codes.

Three modes share one interpreter, so the three forwards agree on every quantization point:
``observe`` (float, records ranges), ``fake`` (float ops, each value rounded onto its grid:
I-ViT's fake-quant model) and ``int`` (integer kernels). The first ``int`` pass (at the end of
``calibrate``) computes every integer constant from the float scales — weight codes, integer
biases, dyadic multipliers, exponential bases — and caches it; later passes use only the cache,
which ``FloatOpGuard`` checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import IntegerOnlyError
from . import ivit
from .dyadic import dyadic, requantize, rounding_shift

aten = torch.ops.aten
QMAX = 127                # symmetric int8 codes [−127, 127]
SOFTMAX_SCALE = 1 / 128   # Shiftmax output grid, codes 0..128
ADD_FRAC = 8              # an add aligns both operands with 8 fraction bits, then rounds once


@dataclass
class Q:
    """An integer tensor and the real value of one code."""
    codes: Tensor  # int64
    scale: float


def _qdq(x: Tensor, scale: float, lo: int = -QMAX, hi: int = QMAX) -> Tensor:
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def _quantize_tensor(v: Tensor) -> Q:
    s = float(v.abs().max().clamp(min=1e-12)) / QMAX
    return Q(torch.round(v / s).to(torch.int64), s)


def _weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel symmetric 8-bit scale of a weight [O, ...] (min/max, I-ViT)."""
    return w.detach().reshape(w.shape[0], -1).abs().amax(1).clamp(min=1e-12) / QMAX


def _fake_weight(w: Tensor) -> Tensor:
    s = _weight_scale(w).reshape(-1, *[1] * (w.dim() - 1))
    return torch.clamp(torch.round(w / s), -QMAX, QMAX) * s


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [K, N] -> int64, on torch._int_mm (VNNI) or an int64 matmul."""
    try:
        return torch._int_mm(a, b).to(torch.int64)
    except RuntimeError:
        return a.to(torch.int64) @ b.to(torch.int64)


class FloatOpGuard(TorchFunctionMode):
    """Raises ``IntegerOnlyError`` on any torch call that computes a tensor from or into a
    floating-point tensor (the integer region of ``IntegerOnlyModel.forward`` runs under it in
    the tests); metadata reads (``.shape``, ``.dtype``) compute nothing and pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, Tensor)]
        computes = any(isinstance(t, Tensor) for t in tree_flatten(out)[0])
        if computes and any(t.is_floating_point() for t in tensors):
            raise IntegerOnlyError(f"float op inside the integer region: {func}")
        return out


class _Run:
    """One pass of the interpreter over the exported graph in one mode."""

    def __init__(self, prog: "IntegerOnlyModel", mode: str):
        self.p, self.mode, self.env = prog, mode, {}

    def val(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.val(x) for x in a)
        return a

    def q(self, a: torch.fx.Node) -> Q:
        """The integer value of an argument (a parameter used as an activation is quantized
        once, per tensor)."""
        v = self.val(a)
        if isinstance(v, Q):
            return v
        return self.const(a.name, lambda: _quantize_tensor(v.detach()))

    def const(self, key: str, make: Callable[[], Any]) -> Any:
        cache = self.p.consts
        if key not in cache:
            if self.p.frozen:
                raise IntegerOnlyError(f"no integer constant for {key!r}: the input differs "
                                       "from the calibration shapes (re-run calibrate)")
            cache[key] = make()
        return cache[key]

    def scale(self, node: torch.fx.Node) -> float:
        if node.name not in self.p.absmax:
            raise IntegerOnlyError("uncalibrated: call calibrate(batches) before running")
        return max(self.p.absmax[node.name], 1e-12) / QMAX

    def out(self, node: torch.fx.Node, y: Tensor) -> Tensor:
        """A float op's output: recorded (observe) or rounded onto its grid (fake)."""
        if self.mode == "observe":
            m = float(y.detach().abs().max())
            self.p.absmax[node.name] = max(self.p.absmax.get(node.name, 0.0), m)
            return y
        return _qdq(y, self.scale(node))

    def requant(self, node: torch.fx.Node, acc: Tensor, in_scale: Callable[[], Tensor | float],
                bits: int = 31) -> Q:
        """Integer codes on this node's grid of an accumulator whose scale (per channel along
        the last axis, or one number) ``in_scale`` gives: round(acc·m·2^−k)."""
        s = self.scale(node)
        m, k = self.const(node.name + ".rq", lambda: dyadic(
            torch.as_tensor(in_scale(), dtype=torch.float64) / s, bits))
        return Q(requantize(acc, m, k, 0, -QMAX, QMAX), s)


# ---- op handlers: handler(run, node) -> value; each handles all three modes -----------------

def _linear(run: _Run, node) -> Any:
    x, w, b = (*node.args, None)[:3]
    W, B = run.val(w), run.val(b)
    if run.mode != "int":
        W = _fake_weight(W) if run.mode == "fake" else W
        return run.out(node, F.linear(run.val(x), W, B))
    xq = run.q(x)
    codes = xq.codes.reshape(-1, W.shape[1])  # [..., I] -> [M, I]
    return _matmul_weight(run, node, xq, codes, W, B, xq.codes.shape[:-1])


def _matmul_weight(run: _Run, node, xq: Q, codes: Tensor, W: Tensor, B, lead) -> Q:
    """codes [M, I] × weight codes [O, I]ᵀ + integer bias, requantised; output [*lead, O]."""
    w_t, b_int, s_w = run.const(node.name + ".w", lambda: _weight_consts(W, B, xq.scale))
    acc = _int_mm(codes.to(torch.int8), w_t) + b_int  # [M, O]
    y = run.requant(node, acc, lambda: s_w * xq.scale)
    return Q(y.codes.reshape(*lead, W.shape[0]), y.scale)


def _weight_consts(W: Tensor, B: Tensor | None, x_scale: float):
    s_w = _weight_scale(W).double()  # [O]
    w = torch.round(W.detach().reshape(W.shape[0], -1).double() / s_w[:, None]).clamp(-QMAX, QMAX)
    b = (torch.round(B.detach().double() / (s_w * x_scale)).to(torch.int64) if B is not None
         else torch.zeros(W.shape[0], dtype=torch.int64))
    return w.to(torch.int8).t().contiguous(), b, s_w  # [I, O]


CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)  # aten.conv2d's (x, w, b, stride, padding, ...)


def _conv2d(run: _Run, node) -> Any:
    x, w, b, stride, padding, dilation, groups = (*node.args, *CONV_DEFAULTS[len(node.args):])
    W, B = run.val(w), run.val(b)
    stride, padding, dilation = (_pair(v) for v in (stride, padding, dilation))
    if run.mode != "int":
        W = _fake_weight(W) if run.mode == "fake" else W
        return run.out(node, F.conv2d(run.val(x), W, B, stride, padding, dilation, groups))
    if groups != 1 or dilation != (1, 1):
        raise IntegerOnlyError(f"{node.name}: grouped or dilated conv has no integer kernel here")
    xq = run.q(x)
    c = F.pad(xq.codes, (padding[1], padding[1], padding[0], padding[0]))
    kh, kw = W.shape[2:]
    p = c.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # [B, C, OH, OW, kh, kw]
    n, oh, ow = p.shape[0], p.shape[2], p.shape[3]
    cols = p.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)  # [B·OH·OW, C·kh·kw]
    y = _matmul_weight(run, node, xq, cols, W, B, (n, oh, ow))  # [B, OH, OW, O]
    return Q(y.codes.permute(0, 3, 1, 2).contiguous(), y.scale)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _layer_norm(run: _Run, node) -> Any:
    x, shape, w, b = node.args[:4]
    W, B = run.val(w), run.val(b)
    if run.mode != "int":
        return run.out(node, F.layer_norm(run.val(x), run.val(shape), W, B,
                                          *node.args[4:5]))
    if W is None or B is None or len(run.val(shape)) != 1:
        raise IntegerOnlyError(f"{node.name}: I-LayerNorm needs an affine norm over one axis")
    xq, c = run.q(x), W.shape[0]
    sign, b_int, scale = run.const(node.name + ".ln", lambda: ivit.layernorm_affine(W, B, c))
    y = ivit.i_layernorm(xq.codes) * sign + b_int
    return run.requant(node, y, lambda: scale, bits=24)  # |y| < 2³¹: 24-bit m keeps it in int64


def _gelu(run: _Run, node) -> Any:
    if run.mode != "int":
        return run.out(node, F.gelu(run.val(node.args[0])))
    xq = run.q(node.args[0])
    base = run.const(node.name + ".exp", lambda: ivit.exp_base(
        ivit.GELU_ALPHA * xq.scale, ivit.GELU_N, 2, run.p.exp))
    y = ivit.shift_gelu(xq.codes, base)  # scale s/128
    return run.requant(node, y, lambda: xq.scale / 128)


def _softmax(run: _Run, node) -> Any:
    x, dim = node.args[:2]
    if run.mode != "int":
        y = torch.softmax(run.val(x), dim)
        return y if run.mode == "observe" else _qdq(y, SOFTMAX_SCALE, 0, 128)
    xq = run.q(x)
    length = xq.codes.shape[dim]
    base = run.const(f"{node.name}.exp{length}", lambda: ivit.exp_base(
        xq.scale, ivit.SOFTMAX_N, length, run.p.exp))
    return Q(ivit.shiftmax(xq.codes, base, dim=dim), SOFTMAX_SCALE)


def _matmul(run: _Run, node) -> Any:
    a, b = node.args[:2]
    if run.mode != "int":
        return run.out(node, torch.matmul(run.val(a), run.val(b)))
    qa, qb = run.q(a), run.q(b)
    return run.requant(node, torch.matmul(qa.codes, qb.codes), lambda: qa.scale * qb.scale)


def _mul(run: _Run, node) -> Any:
    a, b = node.args[:2]
    if not isinstance(b, torch.fx.Node) and isinstance(b, (int, float)):
        if run.mode != "int":
            return run.val(a) * b  # exact on the grid: no new rounding
        qa = run.q(a)
        return Q(qa.codes if b >= 0 else -qa.codes, qa.scale * abs(b))
    if run.mode != "int":
        return run.out(node, run.val(a) * run.val(b))
    qa, qb = run.q(a), run.q(b)
    return run.requant(node, qa.codes * qb.codes, lambda: qa.scale * qb.scale)


def _add(run: _Run, node, sign: int = 1) -> Any:
    a, b = node.args[:2]
    if not isinstance(b, torch.fx.Node):
        raise IntegerOnlyError(f"{node.name}: adding a Python constant has no integer kernel")
    if run.mode != "int":
        return run.out(node, run.val(a) + sign * run.val(b))
    a_, b_ = (_onto(run, node, run.q(v), i, ADD_FRAC) for i, v in enumerate((a, b)))
    total = rounding_shift(a_ + sign * b_, torch.tensor(ADD_FRAC))  # one rounding, as fake's
    return Q(torch.clamp(total, -QMAX, QMAX), run.scale(node))


def _onto(run: _Run, node, q: Q, i: int, frac: int = 0) -> Tensor:
    """Codes of ``q`` on ``node``'s grid with ``frac`` extra fraction bits (unclipped):
    round(codes · 2^frac · s_q/s_node)."""
    m, k = run.const(f"{node.name}.in{i}",
                     lambda: dyadic(q.scale * 2 ** frac / run.scale(node)))
    return requantize(q.codes, m, k, 0, -2 ** 50, 2 ** 50)


def _cat(run: _Run, node) -> Any:
    xs, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    if run.mode != "int":
        return run.out(node, torch.cat([run.val(v) for v in xs], dim))
    parts = [_onto(run, node, run.q(v), i) for i, v in enumerate(xs)]
    return Q(torch.clamp(torch.cat(parts, dim), -QMAX, QMAX), run.scale(node))


def _sym_size(run: _Run, node) -> int:
    x = run.val(node.args[0])
    return (x.codes if isinstance(x, Q) else x).shape[node.args[1]]


MOVES = {aten.reshape.default, aten.view.default, aten.permute.default, aten.transpose.int,
         aten.flatten.using_ints, aten.select.int, aten.slice.Tensor, aten.expand.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default, aten.clone.default,
         aten.t.default, aten.alias.default}
HANDLERS: dict[Any, Callable] = {
    aten.linear.default: _linear, aten.conv2d.default: _conv2d,
    aten.layer_norm.default: _layer_norm, aten.gelu.default: _gelu, aten.softmax.int: _softmax,
    aten.matmul.default: _matmul, aten.mul.Tensor: _mul, aten.add.Tensor: _add,
    aten.sub.Tensor: lambda run, node: _add(run, node, -1), aten.cat.default: _cat,
    aten.sym_size.int: _sym_size, aten.dropout.default: lambda run, node: run.val(node.args[0]),
}


def _move(run: _Run, node) -> Any:
    rest = run.val(node.args[1:])
    if run.mode == "int":  # a parameter is quantized before it moves (its shape may follow x)
        x = run.q(node.args[0])
        return Q(node.target(x.codes, *rest), x.scale)
    return node.target(run.val(node.args[0]), *rest)


class IntegerOnlyModel(nn.Module):
    """A model's integer-only form (module docstring). ``calibrate`` first; then ``forward`` runs
    the integer kernels and ``fake`` the same quantization points in float.

    >>> io = IntegerOnlyModel(model, example)   # example: one input batch
    >>> io.calibrate(batches)                   # ranges, then every integer constant
    >>> logits = io(x)                          # int between input quantizer and dequantizer
    """

    def __init__(self, model: nn.Module, example: Tensor, *, exp: str = "shift"):
        super().__init__()
        if exp not in ("shift", "poly"):
            raise IntegerOnlyError(f"exp={exp!r}: use 'shift' (I-ViT) or 'poly' (I-BERT)")
        self.exp = exp  # the integer exponential of Shiftmax and ShiftGELU
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        try:
            ep = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
        except Exception as e:  # torch.export's own errors are long; keep the first line
            raise IntegerOnlyError("integer-only lowering needs a model torch.export can read: "
                                   f"{str(e).splitlines()[0]}") from None
        self.gm = ep.module()
        self.absmax: dict[str, float] = {}
        self.consts: dict[str, Any] = {}
        self.frozen, self.input_scale = False, None
        bad = sorted({str(n.target) for n in self.gm.graph.nodes if n.op == "call_function"
                      and n.target not in HANDLERS and n.target not in MOVES})
        if bad:
            raise IntegerOnlyError(f"no integer kernel for {', '.join(bad)}; supported: Linear, "
                                   "Conv2d, LayerNorm, GELU, softmax, matmul, add/sub/mul, cat "
                                   "and data movement")

    def _run(self, x: Tensor, mode: str) -> Any:
        run = _Run(self, mode)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                run.env[node.name] = x
            elif node.op == "get_attr":
                run.env[node.name] = _attr(self.gm, node.target)
            elif node.op == "call_module":  # torch.export's shape guards
                run.env[node.name] = None
            elif node.op == "call_function":
                fn = HANDLERS.get(node.target, _move)
                run.env[node.name] = fn(run, node)
            elif node.op == "output":
                return run.val(node.args[0])[0]
        raise IntegerOnlyError("the exported graph has no output")

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> "IntegerOnlyModel":
        """Record each value's max |x| over ``batches`` (float forward), then build the integer
        constants with one integer pass; afterwards the constants are fixed."""
        self.absmax, self.consts, self.frozen = {}, {}, False
        last = None
        for last in batches:
            self._run(last, "observe")
        if last is None:
            raise IntegerOnlyError("calibrate needs at least one batch")
        self.input_scale = float(last.abs().max().clamp(min=1e-12)) / QMAX
        self.integer_forward(self.quantize_input(last[:1]))
        self.frozen = True
        return self

    def quantize_input(self, x: Tensor) -> Q:
        """The input quantizer: float image -> int8 codes (before the integer region)."""
        s = self.input_scale
        if s is None:
            raise IntegerOnlyError("uncalibrated: call calibrate(batches) before running")
        return Q(torch.clamp(torch.round(x / s), -QMAX, QMAX).to(torch.int64), s)

    def integer_forward(self, xq: Q) -> Q:
        """The integer region: input codes -> output codes, integer ops only."""
        return self._run(xq, "int")

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        y = self.integer_forward(self.quantize_input(x))
        return y.codes.to(torch.float32) * y.scale  # the output dequantizer

    @torch.no_grad()
    def fake(self, x: Tensor) -> Tensor:
        """I-ViT's fake-quant forward: float ops, each value rounded onto its grid."""
        return self._run(_qdq(x, self.input_scale), "fake")


def _attr(gm: nn.Module, target: str) -> Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
