"""Compact tensor layout of the artifact: fewer bytes and fewer safetensors header entries.

A quantized model's state holds hundreds of tiny tensors (per-channel scales, biases, 0-d
activation scales). safetensors spends ~90 bytes of JSON header on each, and symmetric
quantizers' zero-points are all zero. ``compact`` stores:

- tensors that are all zero as their shape and dtype only (``layout["zeros"]``);
- a tensor that views the same memory as an earlier entry (a quantizer shared by several
  readers appears under each reader's name; tied weights) once, the other names as aliases;
- tensors of at most ``SMALL_BYTES`` concatenated per dtype into one flat tensor
  ``__small__.<dtype>``, with their names, shapes and offsets in ``layout["small"]``.

``expand`` inverts it exactly (same values, dtypes and shapes): save → load stays bit-identical.
"""
from __future__ import annotations

import torch

SMALL_BYTES = 4096
SMALL_PREFIX = "__small__."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _all_zero(t: torch.Tensor) -> bool:
    """All elements are +0 (a −0.0 must survive the round trip bit for bit)."""
    return t.numel() > 0 and not torch.any(t) and not (
        t.is_floating_point() and bool(torch.signbit(t).any()))


def _identity(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def compact(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to write, layout for the JSON config) of a flat state dict."""
    out: dict[str, torch.Tensor] = {}
    layout: dict = {"zeros": {}, "aliases": {}, "small": {}}
    seen: dict[tuple, str] = {}
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        key = _identity(t)
        if t.numel() and key in seen:
            layout["aliases"][name] = seen[key]
            continue
        seen[key] = name
        if _all_zero(t):
            layout["zeros"][name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        elif t.numel() * t.element_size() <= SMALL_BYTES:
            groups.setdefault(_dtype_name(t.dtype), []).append((name, t))
        else:
            out[name] = t
    for dtype, items in groups.items():
        out[SMALL_PREFIX + dtype] = torch.cat([t.reshape(-1) for _, t in items])
        layout["small"][dtype] = [[name, list(t.shape)] for name, t in items]
    return out, layout


def expand(tensors: dict[str, torch.Tensor], layout: dict | None) -> dict[str, torch.Tensor]:
    """The flat state dict that ``compact`` was given (aliases become the same tensor)."""
    if not layout:
        return dict(tensors)
    state = {k: v for k, v in tensors.items() if not k.startswith(SMALL_PREFIX)}
    for dtype, items in layout["small"].items():
        flat, offset = tensors[SMALL_PREFIX + dtype], 0
        for name, shape in items:
            n = 1
            for d in shape:
                n *= d
            state[name] = flat[offset: offset + n].reshape(shape).clone()
            offset += n
    for name, info in layout["zeros"].items():
        state[name] = torch.zeros(info["shape"], dtype=getattr(torch, info["dtype"]))
    for name, target in layout["aliases"].items():
        state[name] = state[target]
    return state
