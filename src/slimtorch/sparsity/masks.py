"""Sparsity masks: patterns, selection from scores, the layers a method prunes, and the
masks a model holds.

A mask is a bool tensor shaped like a layer's weight, True where the weight is kept; it sits
on the layer's twin (``QuantLayerMixin.set_weight_mask``), which computes with Q(W)⊙M.

Patterns (``Pattern``):
- unstructured at a sparsity s ∈ (0, 1): the ⌊s·n⌋ lowest-scored weights of each comparison
  group are pruned (the group is a method's choice: the layer, an output row, the model);
- N:M (``"2:4"``, ``"4:8"``): in every run of M consecutive weights *along the input
  dimension* the N highest-scored are kept. For a convolution the input dimension is its input
  channels: the groups run over C at each kernel tap (weight [O, C, kh, kw] seen as
  [O, kh, kw, C]), the layout of NVIDIA's ASP (the public SR-STE code instead cuts the
  flattened [C·kh·kw] row into runs of M, which for a k×k conv mixes kernel taps), so C must
  be a multiple of M (a depthwise conv never is).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import MaskError
from ..quant.modules import QuantLayerMixin
from ..quant.prepare import META_ATTR, quant_layers
from ..recipe import match_override


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``sparsity`` (n = m = None), or N:M (keep n of every m)."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:.0%} unstructured"


def parse_pattern(sparsity: float | None, pattern: str | None) -> Pattern:
    """A method's ``sparsity`` / ``pattern`` settings as a Pattern (errors name the fix)."""
    if pattern not in (None, "unstructured"):
        m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
        if m is None:
            raise MaskError(f"pattern {pattern!r} is not N:M (e.g. '2:4') or 'unstructured'")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise MaskError(f"pattern {pattern!r}: N:M keeps N of every M weights, so it needs "
                            "0 < N < M (e.g. 2:4)")
        return Pattern(1 - n / mm, n, mm)
    if sparsity is None:
        raise MaskError("give a sparsity (a fraction in (0, 1), e.g. sparsity: 0.5) or an N:M "
                        "pattern (pattern: '2:4')")
    check_sparsity(sparsity)
    return Pattern(float(sparsity))


def check_sparsity(s: float, where: str = "sparsity") -> None:
    if not 0 < s < 1:
        raise MaskError(f"{where} {s} is outside (0, 1): it is the fraction of weights "
                        "pruned, e.g. 0.5 for half of them")


def nm_view(w: Tensor) -> Tensor:
    """A weight with its input dimension last: Linear [O, I] as is, conv [O, C, kh, kw] as
    [O, kh, kw, C] (a view; ``nm_unview`` inverts it)."""
    return w if w.dim() == 2 else w.movedim(1, -1)


def nm_unview(v: Tensor, like: Tensor) -> Tensor:
    return v if like.dim() == 2 else v.movedim(-1, 1).contiguous()


def nm_fits(shape: Iterable[int], m: int) -> str | None:
    """Why an N:M pattern cannot be laid on a weight of ``shape``, or None."""
    shape = list(shape)
    width = shape[1]
    if width % m:
        what = "input channels" if len(shape) > 2 else "input features"
        return f"its {width} {what} are not a multiple of M = {m}"
    return None


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores of every m consecutive entries along the input dimension."""
    why = nm_fits(score.shape, m)
    if why is not None:
        raise MaskError(f"an N:M = {n}:{m} mask does not fit a weight of shape "
                        f"{list(score.shape)}: {why}; use unstructured sparsity for this layer "
                        "or exclude it")
    v = nm_view(score)
    g = v.reshape(-1, m)                                              # [groups, m]
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, g.topk(n, dim=1).indices, True)
    return nm_unview(keep.reshape(v.shape), score)


def prune_lowest(score: Tensor, sparsity: float, dim: int | None = None) -> Tensor:
    """Keep-mask pruning the ⌊sparsity·k⌋ lowest scores of each slice along ``dim`` (rows of
    length k), or of the whole tensor when ``dim`` is None (ties: the lower index goes)."""
    if dim is None:
        flat = score.reshape(1, -1)
    else:
        flat = score.movedim(dim, -1).reshape(-1, score.shape[dim])
    k = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.argsort(dim=1, stable=True)[:, :k], False)
    if dim is None:
        return keep.reshape(score.shape)
    moved = score.movedim(dim, -1).shape
    return keep.reshape(moved).movedim(-1, dim)


def select(score: Tensor, pattern: Pattern, sparsity: float | None = None,
           per_row: bool = False) -> Tensor:
    """The keep-mask of a layer from its weight scores: N:M, or unstructured at ``sparsity``
    (the pattern's unless given) over each output row (``per_row``) or the whole layer."""
    if pattern.structured:
        return nm_mask(score, pattern.n, pattern.m)
    s = pattern.sparsity if sparsity is None else sparsity
    if per_row:
        return prune_lowest(score.reshape(score.shape[0], -1), s, dim=1).reshape(score.shape)
    return prune_lowest(score, s)


# ------------------------------------------------------------------ which layers
def compute_layers(model: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    """The model's Conv/Linear twins in graph order (the plan's order)."""
    layers = dict(quant_layers(model))
    plan = getattr(model, META_ATTR, {}).get("plan", {}).get("layers", {})
    order = [f for f in plan if f in layers] or list(layers)
    return [(f, layers[f]) for f in order
            if isinstance(layers[f], (nn.Linear, nn.modules.conv._ConvNd))]


def targets(model: nn.Module, cfg) -> tuple[list[tuple[str, nn.Module, float]], dict[str, str]]:
    """(fqn, layer, sparsity) of every layer ``cfg`` prunes, and {fqn: why not} of the rest.
    ``cfg`` has ``dense_first``, ``dense_last``, ``dense_depthwise``, ``exclude`` (fqn / ``re:regex`` / type name /
    ``depthwise``) and ``ratios`` (the same keys → a sparsity, first match wins) and a
    ``pattern()``."""
    pattern = cfg.pattern_obj()
    layers = compute_layers(model)
    described = {l["fqn"]: l for l in getattr(model, META_ATTR, {}).get("graph", {}).get(
        "layers", [])}
    out, skipped = [], {}
    for i, (fqn, layer) in enumerate(layers):
        info = described.get(fqn, {})
        kind = info.get("type", type(layer).__name__)  # the float layer's type name
        depthwise = info.get("depthwise", False)
        if cfg.dense_first and i == 0:
            skipped[fqn] = "first layer (dense_first)"
            continue
        if cfg.dense_last and i == len(layers) - 1:
            skipped[fqn] = "last layer (dense_last)"
            continue
        if cfg.dense_depthwise and depthwise:
            skipped[fqn] = "depthwise (dense_depthwise)"
            continue
        if match_override(dict.fromkeys(cfg.exclude), fqn, kind, depthwise)[0]:
            skipped[fqn] = "excluded"
            continue
        hit, ratio = match_override(cfg.ratios, fqn, kind, depthwise)
        if pattern.structured:
            why = nm_fits(layer.weight.shape, pattern.m)
            if why is not None:
                skipped[fqn] = f"N:M {pattern.n}:{pattern.m} does not fit: {why}"
                continue
        out.append((fqn, layer, float(ratio) if hit else pattern.sparsity))
    if not out:
        raise MaskError(f"no layer of this model can take {pattern}: "
                        + "; ".join(f"{f}: {w}" for f, w in list(skipped.items())[:4])
                        + (" ..." if len(skipped) > 4 else ""))
    return out, skipped


# ------------------------------------------------------------------ a model's masks
def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """{fqn: keep-mask} of every masked layer."""
    return {f: m.weight_mask for f, m in quant_layers(model) if m.weight_mask is not None}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Put ``masks`` ({fqn: keep-mask}, e.g. from ``masks_of`` of another run) on a prepared
    model's layers; a name the model does not have or a shape that differs is a MaskError."""
    layers = dict(quant_layers(model))
    missing = [f for f in masks if f not in layers]
    if missing:
        raise MaskError(f"the model has no prepared layer {missing[0]!r} (masks for "
                        f"{len(missing)} layers do not fit): masks belong to the architecture "
                        "they were made on")
    for f, mask in masks.items():
        layers[f].set_weight_mask(mask)


def mask_sparsity(mask: Tensor) -> float:
    """The fraction of a keep-mask's weights that are pruned (6 decimals, for the stats)."""
    return round(1 - mask.float().mean().item(), 6)


def sparsity_summary(model: nn.Module) -> dict[str, Any] | None:
    """Per-layer and overall sparsity of the masked layers (None if there are none): the
    fraction of zeros counted over all Conv/Linear weights and over the masked ones."""
    masks = masks_of(model)
    if not masks:
        return None
    per_layer = {f: mask_sparsity(m) for f, m in masks.items()}
    total = sum(m.weight.numel() for _, m in compute_layers(model))
    pruned = sum(int((~m).sum()) for m in masks.values())
    masked = sum(m.numel() for m in masks.values())
    return {"layers": per_layer, "masked_layers": len(masks),
            "sparsity_masked": round(pruned / masked, 6),
            "sparsity_all": round(pruned / max(1, total), 6)}
