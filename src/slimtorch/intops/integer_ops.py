"""The op handlers of the integer-only interpreter (``integer_only.py``): one function per ATen
op, each running in all three modes — ``observe`` (float, records ranges), ``fake`` (float,
values rounded onto their grids) and ``int`` (integer kernels, constants from the cache)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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


def qdq(x: Tensor, scale: float, lo: int = -QMAX, hi: int = QMAX) -> Tensor:
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


class Pass:
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
        return qdq(y, self.scale(node))

    def requant(self, node: torch.fx.Node, acc: Tensor, in_scale: Callable[[], Tensor | float],
                bits: int = 31) -> Q:
        """Integer codes on this node's grid of an accumulator whose scale (per channel along
        the last axis, or one number) ``in_scale`` gives: round(acc·m·2^−k)."""
        s = self.scale(node)
        m, k = self.const(node.name + ".rq", lambda: dyadic(
            torch.as_tensor(in_scale(), dtype=torch.float64) / s, bits))
        return Q(requantize(acc, m, k, 0, -QMAX, QMAX), s)


# ---- op handlers: handler(run, node) -> value; each handles all three modes -----------------

def _linear(run: Pass, node) -> Any:
    x, w, b = (*node.args, None)[:3]
    W, B = run.val(w), run.val(b)
    if run.mode != "int":
        W = _fake_weight(W) if run.mode == "fake" else W
        return run.out(node, F.linear(run.val(x), W, B))
    xq = run.q(x)
    codes = xq.codes.reshape(-1, W.shape[1])  # [..., I] -> [M, I]
    return _matmul_weight(run, node, xq, codes, W, B, xq.codes.shape[:-1])


def _matmul_weight(run: Pass, node, xq: Q, codes: Tensor, W: Tensor, B, lead) -> Q:
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


def _conv2d(run: Pass, node) -> Any:
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


def _layer_norm(run: Pass, node) -> Any:
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


def _gelu(run: Pass, node) -> Any:
    if run.mode != "int":
        return run.out(node, F.gelu(run.val(node.args[0])))
    xq = run.q(node.args[0])
    base = run.const(node.name + ".exp", lambda: ivit.exp_base(
        ivit.GELU_ALPHA * xq.scale, ivit.GELU_N, 2, run.p.exp))
    y = ivit.shift_gelu(xq.codes, base)  # scale s/128
    return run.requant(node, y, lambda: xq.scale / 128)


def _softmax(run: Pass, node) -> Any:
    x, dim = node.args[:2]
    if run.mode != "int":
        y = torch.softmax(run.val(x), dim)
        return y if run.mode == "observe" else qdq(y, SOFTMAX_SCALE, 0, 128)
    xq = run.q(x)
    length = xq.codes.shape[dim]
    base = run.const(f"{node.name}.exp{length}", lambda: ivit.exp_base(
        xq.scale, ivit.SOFTMAX_N, length, run.p.exp))
    return Q(ivit.shiftmax(xq.codes, base, dim=dim), SOFTMAX_SCALE)


def _matmul(run: Pass, node) -> Any:
    a, b = node.args[:2]
    if run.mode != "int":
        return run.out(node, torch.matmul(run.val(a), run.val(b)))
    qa, qb = run.q(a), run.q(b)
    return run.requant(node, torch.matmul(qa.codes, qb.codes), lambda: qa.scale * qb.scale)


def _mul(run: Pass, node) -> Any:
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


def _add(run: Pass, node, sign: int = 1) -> Any:
    a, b = node.args[:2]
    if not isinstance(b, torch.fx.Node):
        raise IntegerOnlyError(f"{node.name}: adding a Python constant has no integer kernel")
    if run.mode != "int":
        return run.out(node, run.val(a) + sign * run.val(b))
    a_, b_ = (_onto(run, node, run.q(v), i, ADD_FRAC) for i, v in enumerate((a, b)))
    total = rounding_shift(a_ + sign * b_, torch.tensor(ADD_FRAC))  # one rounding, as fake's
    return Q(torch.clamp(total, -QMAX, QMAX), run.scale(node))


def _onto(run: Pass, node, q: Q, i: int, frac: int = 0) -> Tensor:
    """Codes of ``q`` on ``node``'s grid with ``frac`` extra fraction bits (unclipped):
    round(codes · 2^frac · s_q/s_node)."""
    m, k = run.const(f"{node.name}.in{i}",
                     lambda: dyadic(q.scale * 2 ** frac / run.scale(node)))
    return requantize(q.codes, m, k, 0, -2 ** 50, 2 ** 50)


def _cat(run: Pass, node) -> Any:
    xs, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    if run.mode != "int":
        return run.out(node, torch.cat([run.val(v) for v in xs], dim))
    parts = [_onto(run, node, run.q(v), i) for i, v in enumerate(xs)]
    return Q(torch.clamp(torch.cat(parts, dim), -QMAX, QMAX), run.scale(node))


def _sym_size(run: Pass, node) -> int:
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


def move_codes(run: Pass, node) -> Any:
    rest = run.val(node.args[1:])
    if run.mode == "int":  # a parameter is quantized before it moves (its shape may follow x)
        x = run.q(node.args[0])
        return Q(node.target(x.codes, *rest), x.scale)
    return node.target(run.val(node.args[0]), *rest)
