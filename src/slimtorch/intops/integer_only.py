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

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import IntegerOnlyError
from .integer_ops import HANDLERS, MOVES, QMAX, Q, move_codes, qdq, Pass


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
        self.example_shape = tuple(example.shape)
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
        run = Pass(self, mode)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                run.env[node.name] = x
            elif node.op == "get_attr":
                run.env[node.name] = _attr(self.gm, node.target)
            elif node.op == "call_module":  # torch.export's shape guards
                run.env[node.name] = None
            elif node.op == "call_function":
                fn = HANDLERS.get(node.target, move_codes)
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
        return self._run(qdq(x, self.input_scale), "fake")


def _attr(gm: nn.Module, target: str) -> Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
