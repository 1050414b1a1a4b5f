"""Where data-free synthesis reads the model's statistics: one ``TorchFunctionMode`` active
only during a forward, recording every ``batch_norm`` call that carries running statistics (its
input is the tensor to match) and every attention output — a matmul with a softmax-derived
operand (softmax(QKᵀ)·V) or ``F.scaled_dot_product_attention``. Found by the ops the model
runs, never by module names or classes."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_MATMULS = {"matmul", "__matmul__", "bmm", "__rmatmul__"}
# ops through which a softmax output stays "attention probabilities"
_CARRY = {"dropout", "contiguous", "to", "type_as", "clone", "view", "reshape", "float"}


@dataclass
class BNSite:
    """One batch_norm call: its input and the running statistics it normalises with."""
    x: Tensor
    mean: Tensor
    var: Tensor


class Tap(TorchFunctionMode):
    """Records BN inputs and attention outputs during one forward (``with Tap() as tap``)."""

    def __init__(self):
        super().__init__()
        self.bn: list[BNSite] = []
        self.attention: list[Tensor] = []  # [B, H, N, Dh] each
        self._probs: dict[int, weakref.ref] = {}  # id -> softmax-derived tensors

    def _is_probs(self, t: Any) -> bool:
        ref = self._probs.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = getattr(func, "__name__", "")
        if op == "batch_norm":
            _record_bn(self.bn, args, kwargs)
        elif op == "softmax" or (op in _CARRY and args and self._is_probs(args[0])):
            if isinstance(out, Tensor):
                self._probs[id(out)] = weakref.ref(out)
        elif op in _MATMULS and any(self._is_probs(a) for a in args[:2]):
            self.attention.append(out)
        elif op == "scaled_dot_product_attention":
            self.attention.append(out)
        return out


def _record_bn(sites: list[BNSite], args: tuple, kwargs: dict) -> None:
    names = ("input", "running_mean", "running_var")
    got = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
    mean, var = got.get("running_mean"), got.get("running_var")
    if isinstance(mean, Tensor) and isinstance(var, Tensor):
        sites.append(BNSite(got["input"], mean.detach(), var.detach()))


def probe(model: nn.Module, x: Tensor) -> Tap:
    """One recorded forward of ``model`` on ``x`` (no gradients)."""
    with torch.no_grad(), Tap() as tap:
        model(x)
    return tap
