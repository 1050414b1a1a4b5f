"""Quantizers for functional sites: activation×activation matmuls, attention, residual adds.

A ``FunctionalSites`` module is attached to the model root. While the root's forward runs it
enters a ``TorchFunctionMode`` that intercepts matmul-like calls, adds and
``F.scaled_dot_product_attention``; the site's name (see ``graph.tracker``) selects its
quantizers. Matmul and add: both operands are quantized (an add on two int8 grids is what an
integer engine's QLinearAdd computes, Jacob et al. 2018 §2.4). SDPA is evaluated as its
reference definition with quantized q, k, attention probabilities and v:

    P = softmax(Q(q)·Q(k)ᵀ·scale + mask),   out = Q(P)·Q(v)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..graph.tracker import FUNCTIONAL_KINDS, ModuleTracker
from .kinds import make_quantizer
from .quantizer import Quantizer
from .spec import QuantSpec

SITE_ROLES = {"matmul": ("a", "b"), "sdpa": ("q", "k", "probs", "v"), "add": ("a", "b")}
INPLACE = {"__iadd__", "add_"}


def _slot(key: str) -> str:
    return key.replace(".", "/")  # ModuleDict keys may not contain dots


class FunctionalSites(nn.Module):
    """Holds the functional-site quantizers of one model and applies them at run time."""

    def __init__(self):
        super().__init__()
        self.sites = nn.ModuleDict()
        self.tracker: ModuleTracker | None = None
        self._handles = []
        self._mode: _SiteMode | None = None
        # optional tap (key, kind, args, kwargs, out) called after each site runs; methods
        # use it to read a site's float operands and its output (e.g. PTQ4ViT)
        self.tap = None

    def add_site(self, key: str, kind: str, spec: QuantSpec, seed: int, max_samples: int,
                 overrides: dict[str, QuantSpec] | None = None) -> None:
        roles = SITE_ROLES[kind]
        specs = [(overrides or {}).get(r, spec) for r in roles]
        self.sites[_slot(key)] = nn.ModuleList(
            make_quantizer(s, seed=seed + i, max_samples=max_samples)
            for i, s in enumerate(specs))

    def site(self, key: str) -> nn.ModuleList | None:
        slot = _slot(key)
        return self.sites[slot] if slot in self.sites else None

    def keys(self) -> list[str]:
        return [k.replace("/", ".") for k in self.sites.keys()]

    def install(self, model: nn.Module) -> None:
        """Hook the model root so the interception is active during its forward only."""
        if self.tracker is not None or not len(self.sites):
            return
        self.tracker = ModuleTracker(model, opaque=(Quantizer, FunctionalSites))
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]

    def reinstall(self, model: nn.Module) -> None:
        """Hook the model's current modules again (after modules were swapped)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        for h in self._handles:
            h.remove()
        self._handles = []
        self.install(model)

    def _enter(self, module, args):
        self._mode = _SiteMode(self)
        self._mode.__enter__()

    def _exit(self, module, args, output):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self.tracker.reset()


class _SiteMode(TorchFunctionMode):
    def __init__(self, owner: FunctionalSites):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = FUNCTIONAL_KINDS.get(getattr(func, "__name__", ""))
        if kind is None:
            return func(*args, **kwargs)
        key = self.owner.tracker.next_key(kind)
        qs = self.owner.site(key) if key is not None else None
        if qs is None:
            return func(*args, **kwargs)
        if kind == "add":
            out = quantized_add(qs, func, args, kwargs)
        elif kind == "matmul":
            out = func(qs[0](args[0]), qs[1](args[1]), *args[2:], **kwargs)
        else:
            out = quantized_sdpa(qs, *args, **kwargs)
        if self.owner.tap is not None:
            self.owner.tap(key, kind, args, kwargs, out)
        return out


def quantized_add(qs, func, args: tuple, kwargs: dict) -> Tensor:
    """Q_a(a) + Q_b(b); an in-place add writes the sum into ``a`` as the original would."""
    total = torch.add(qs[0](args[0]), qs[1](args[1]), *args[2:], **kwargs)
    if getattr(func, "__name__", "") in INPLACE:
        return args[0].copy_(total)
    return total


def quantized_sdpa(qs, query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale=None,
                   enable_gqa: bool = False) -> Tensor:
    """Reference scaled_dot_product_attention with quantizers (q, k, probs, v)."""
    q_q, q_k, q_p, q_v = qs
    if enable_gqa:  # repeat kv heads to match query heads
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    probs = sdpa_probs(q_q(query), q_k(key), attn_mask, is_causal, scale)
    if dropout_p > 0:
        probs = torch.dropout(probs, dropout_p, True)
    return torch.matmul(q_p(probs), q_v(value))


def sdpa_probs(query: Tensor, key: Tensor, attn_mask=None, is_causal: bool = False,
               scale=None) -> Tensor:
    """softmax(q·kᵀ·scale + mask) of scaled_dot_product_attention's reference definition,
    [..., T, S] (key heads already matching the query heads)."""
    t, s = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # [..., T, S]
    if is_causal:
        keep = torch.ones(t, s, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:  # bool: True = may attend; float: added
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.softmax(scores, dim=-1)
