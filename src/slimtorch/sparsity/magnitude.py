"""Magnitude pruning (per layer, or one global threshold over all pruned layers) and random
masks, the floor every method must beat (Liu et al., "Random search as a baseline for sparse
neural network architecture search": random masks at the same per-layer ratios).

Data-free: the calibration data only gives the example the graph is captured on."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..methods import MethodContext, register_method
from .base import SparsityConfig, record
from .masks import mask_sparsity, prune_lowest, select, targets


class MagnitudeConfig(SparsityConfig):
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: each layer at its ratio; global: one |w| threshold over "
        "every pruned layer (their ratios follow)")

    @model_validator(mode="after")
    def _global_unstructured(self):
        if self.scope == "global" and (self.pattern not in (None, "unstructured") or self.ratios
                                       or self.allocation != "uniform"):
            raise ValueError("scope: global sets every layer's ratio from one threshold: it "
                             "takes one unstructured sparsity, no pattern or ratios")
        return self


class RandomConfig(SparsityConfig):
    """Random scores; the same pattern and per-layer ratios as the method it is a floor for."""


@register_method("magnitude", MagnitudeConfig)
@torch.no_grad()
def apply(model, cfg: MagnitudeConfig, ctx: MethodContext) -> dict[str, Any]:
    layers, skipped = targets(model, cfg)
    pattern = cfg.pattern_obj()
    if cfg.scope == "global":
        scores = torch.cat([layer.weight.detach().abs().reshape(-1) for _, layer, _ in layers])
        keep = prune_lowest(scores, pattern.sparsity).split(
            [layer.weight.numel() for _, layer, _ in layers])
        masks = {f: k.reshape(layer.weight.shape) for (f, layer, _), k in zip(layers, keep)}
    else:
        masks = {f: select(layer.weight.detach().abs(), pattern, s) for f, layer, s in layers}
    for f, layer, _ in layers:
        layer.set_weight_mask(masks[f])
    return record(model, {f: {"sparsity": mask_sparsity(masks[f])}
                          for f, _, _ in layers}, skipped)


@register_method("random", RandomConfig)
@torch.no_grad()
def apply_random(model, cfg: RandomConfig, ctx: MethodContext) -> dict[str, Any]:
    layers, skipped = targets(model, cfg)
    pattern = cfg.pattern_obj()
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 17)
    stats = {}
    for f, layer, s in layers:
        mask = select(torch.rand(layer.weight.shape, generator=gen), pattern, s)
        layer.set_weight_mask(mask)
        stats[f] = {"sparsity": mask_sparsity(mask)}
    return record(model, stats, skipped)
