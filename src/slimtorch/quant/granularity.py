"""Quantization granularity as frozen dataclasses (no -1 / 0 sentinels).

In YAML a granularity is written ``per_tensor``, ``per_channel`` (output channels, axis 0) or
``per_group(64)`` (groups of 64 consecutive input elements per output row); for activations
``per_channel(-1)`` is one static scale per feature (last dim) and ``per_channel(1)`` one per
head of a [batch, heads, tokens, head_dim] attention operand; activations also ``per_token`` (one scale per row of the last dimension, computed at run time: ``dynamic``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (0 = output channels of a weight)."""

    axis: int = 0

    def __str__(self) -> str:
        return "per_channel" if self.axis == 0 else f"per_channel({self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """One scale per group of ``size`` consecutive input elements in each output row."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"per_group size must be >= 1, got {self.size}")

    def __str__(self) -> str:
        return f"per_group({self.size})"


@dataclass(frozen=True)
class PerToken:
    """Activations only: one scale per token (each slice along the last dimension, i.e. each
    row of ``x.reshape(-1, x.shape[-1])``), from that token's own range at run time."""

    def __str__(self) -> str:
        return "per_token"


Granularity = PerTensor | PerChannel | PerGroup | PerToken
_CALL = re.compile(r"^(per_tensor|per_channel|per_group|per_token)(?:\((-?\d+)\))?$")


def parse_granularity(value: object) -> Granularity:
    """Parse ``per_tensor`` / ``per_channel`` / ``per_channel(1)`` / ``per_group(64)`` /
    ``per_token``."""
    if isinstance(value, (PerTensor, PerChannel, PerGroup, PerToken)):
        return value
    m = _CALL.match(str(value).strip().replace(" ", "")) if isinstance(value, str) else None
    if m is None:
        raise ValueError(
            f"granularity {value!r} is not one of per_tensor, per_channel, per_group(N), "
            "per_token")
    kind, arg = m.groups()
    if kind == "per_token":
        if arg is not None:
            raise ValueError("per_token takes no argument")
        return PerToken()
    if kind == "per_tensor":
        if arg is not None:
            raise ValueError("per_tensor takes no argument")
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(int(arg) if arg is not None else 0)
    if arg is None:
        raise ValueError("per_group needs a group size, e.g. per_group(64)")
    if int(arg) < 1:
        raise ValueError(f"per_group size must be >= 1, got {arg}")
    return PerGroup(int(arg))
