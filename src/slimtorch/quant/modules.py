"""Quantized layers: a registered float layer type plus a weight and an input quantizer.

``register_qmodule(nn.Linear)`` maps a float layer type to its quantized twin; ``from_module``
builds the twin sharing the float module's parameters, buffers and attributes. A *subclass* of a
registered type (timm's ``Conv2dSame``, which pads in its own forward) gets a twin made once per
subclass, ``class QuantX(QuantConv2d, X)``: X's methods stay, and when X overrides the base
forward, X's forward runs on the quantized input with the quantized weight in place of
``weight`` (``subclass_twin``), so its own behaviour is kept. Activations are quantized at the layer
input (that is where an int8 kernel reads them), weights per the recipe. ``freeze()`` stores the
integer weight codes (``weight_int``) and replaces ``weight`` by their exact dequantisation, so
a frozen layer costs the same as a float one in fake-quant evaluation and reloads bit-exactly.
A Linear twin may carry an explicit *input transform* applied before its input quantizer
(``transform_input``, shared by the fake-quant layer, the integer kernels and, through tracing,
the ONNX export): a per-channel scale (``input_scale`` s, set by the channel-scaling methods
SmoothQuant/AWQ where no earlier op can absorb 1/s): x ← x/s; then an orthogonal rotation
with Kronecker structure R = A ⊗ B (``input_rot_a`` [a, a], ``input_rot_b`` [b, b], set by
``rotate``'s online Hadamard): x ← x·R, computed as Aᵀ·X·B on x reshaped [..., a, b] (two small
matmuls instead of one [a·b]² one). The plan records both (``"input_scale": true``,
``"input_rotation": [a, b]``) so ``attach`` makes placeholders that ``load`` fills.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MaskError
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
    """The quantized twin class of a float layer: the registered twin of its exact class, or
    for a subclass of a registered class the subclass twin; None if it has none."""
    if isinstance(module, QuantLayerMixin):
        return None
    cls = type(module)
    if cls in QMODULES:
        return QMODULES[cls]
    for float_cls, q_cls in QMODULES.items():
        if isinstance(module, float_cls):
            return subclass_twin(cls, float_cls, q_cls)
    return None


_TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def subclass_twin(cls: type[nn.Module], base: type[nn.Module], q_cls: type[nn.Module]
                  ) -> type[nn.Module]:
    """``class QuantX(q_cls, X)`` for a subclass X of the registered ``base`` (made once)."""
    if cls not in _TWINS:
        body = {"__module__": __name__, "__doc__": f"Quantized twin of {cls.__qualname__}.",
                "float_cls": cls}
        if cls.forward is not base.forward:
            body["forward"] = _subclass_forward
        _TWINS[cls] = type(f"Quant{cls.__name__}", (q_cls, cls), body)
    return _TWINS[cls]


def _subclass_forward(self, x: Tensor, *args, **kwargs):
    """The float subclass's own forward on Q(x), reading Q(W) as ``self.weight``."""
    qx = self.quantized_input(x)
    with substituted(self, "weight", self.quantized_weight()):
        return self.float_cls.forward(self, qx, *args, **kwargs)


@contextmanager
def substituted(module: nn.Module, name: str, value: Tensor):
    """``module.<name>`` reads ``value`` (a tensor, gradients flow) inside the block; the
    parameter is put back after (as ``torch.func.functional_call`` does)."""
    saved = module._parameters[name]
    module._parameters[name] = value
    try:
        yield
    finally:
        module._parameters[name] = saved


def kron_rotate(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x·(A ⊗ B) over the last dim: entry i·b + j of x is X[i, j], and (A ⊗ B) maps X to Aᵀ·X·B."""
    xs = x.reshape(*x.shape[:-1], a.shape[0], b.shape[0])             # [..., a, b]
    return torch.matmul(a.t(), torch.matmul(xs, b)).reshape(x.shape)  # [..., a·b]


def transform_input(x: Tensor, scale: Tensor | None,
                    rotation: tuple[Tensor, Tensor] | None) -> Tensor:
    """A layer's explicit input transform (module docstring): x/s, then x·(A ⊗ B)."""
    if scale is not None:
        x = x / scale
    if rotation is not None:
        x = kron_rotate(x, *rotation)
    return x


def copy_input_transform(kernel: nn.Module, layer: "QuantLayerMixin") -> None:
    """Give an execution module (``intops``) the layer's input transform as buffers
    ``in_scale``, ``in_rot_a``, ``in_rot_b``; it applies them with ``kernel_input``."""
    for src, dst in (("input_scale", "in_scale"), ("input_rot_a", "in_rot_a"),
                     ("input_rot_b", "in_rot_b")):
        t = getattr(layer, src)
        kernel.register_buffer(dst, None if t is None else t.detach().clone())


def kernel_input(kernel: nn.Module, x: Tensor) -> Tensor:
    """``transform_input`` with the buffers ``copy_input_transform`` gave ``kernel``."""
    rot = None if kernel.in_rot_a is None else (kernel.in_rot_a, kernel.in_rot_b)
    return transform_input(x, kernel.in_scale, rot)


# attributes every nn.Module has (state dicts, hooks): a twin gets fresh ones of its own
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


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
        self.register_buffer("input_scale", None)  # explicit per-channel input scale, or None
        self.register_buffer("input_rot_a", None)  # Kronecker factors of an input rotation
        self.register_buffer("input_rot_b", None)
        self.register_buffer("weight_mask", None, persistent=False)  # sparsity: kept weights

    def set_input_scale(self, s: Tensor) -> None:
        """Divide the input's channels (last dim) by ``s`` before quantizing it."""
        self.input_scale = s.detach().reshape(-1).clone()  # [in_features]

    def set_input_rotation(self, a: Tensor, b: Tensor) -> None:
        """Multiply the input (after any input scale) by the orthogonal A ⊗ B (Linear only:
        the last dim of a conv input is not its channel dim)."""
        if not isinstance(self, nn.Linear):
            raise TypeError(f"an input rotation needs a Linear layer, not {type(self).__name__}")
        if a.shape[0] * b.shape[0] != self.weight.shape[1]:
            raise ValueError(f"rotation factors {a.shape[0]}·{b.shape[0]} do not make the "
                             f"{self.weight.shape[1]} input features")
        self.input_rot_a = a.detach().to(self.weight.dtype).clone()  # [a, a]
        self.input_rot_b = b.detach().to(self.weight.dtype).clone()  # [b, b]

    @property
    def input_rotation(self) -> tuple[Tensor, Tensor] | None:
        return None if self.input_rot_a is None else (self.input_rot_a, self.input_rot_b)

    @torch.no_grad()
    def set_weight_mask(self, mask: Tensor | None) -> None:
        """Keep only the weights where ``mask`` is True (the others become exactly zero, in
        the parameter too); ``None`` removes the mask."""
        if mask is None:
            self.weight_mask = None
            return
        if mask.shape != self.weight.shape:
            raise MaskError(f"a mask of shape {list(mask.shape)} does not fit a weight of shape "
                            f"{list(self.weight.shape)}: masks are per layer, made for this "
                            "architecture (see slimtorch.sparsity.masks_of)")
        self.weight_mask = mask.to(device=self.weight.device, dtype=torch.bool).clone()
        self.weight.mul_(self.weight_mask)

    def calibrate_weight(self) -> None:
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate(self.weight)

    def quantized_weight(self) -> Tensor:
        if self.frozen:
            return self.weight  # already masked (set_weight_int)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return w if self.weight_mask is None else w * self.weight_mask

    def quantized_input(self, x: Tensor) -> Tensor:
        x = transform_input(x, self.input_scale, self.input_rotation)
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
        wq, mask = self.weight_quantizer, self.weight_mask
        if mask is not None:  # a pruned weight holds the grid's code of zero
            q = torch.where(mask, q, wq.quantize_int(torch.zeros_like(self.weight)).to(q.dtype))
        self.register_buffer("weight_int", q.to(torch.int16), persistent=False)
        w = wq.dequantize_int(q)
        if mask is not None:
            w = w * mask  # exactly zero, also on a grid without a zero point
        self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
        self.frozen = True

    @classmethod
    def from_module(cls, module: nn.Module, w_spec, a_spec, *, seed=0, max_samples=1 << 18):
        """The twin of ``module``: its parameters, buffers, children and attributes (shared,
        not copied), plus the quantizers; the float module's hooks are not carried over."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in vars(module).items()
                             if k not in _MODULE_INTERNALS})
        new._parameters.update(module._parameters)
        new._buffers.update(module._buffers)
        new._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
        new._modules.update(module._modules)
        new._init_quant(w_spec, a_spec, seed, max_samples)
        return new


@register_qmodule(nn.Linear)
class QuantLinear(QuantLayerMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConvNd(QuantLayerMixin):
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

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)
