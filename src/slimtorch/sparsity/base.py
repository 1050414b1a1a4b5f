"""What every sparsity method shares: its config (the pattern, which layers, per-layer
ratios) and the record it returns."""
from __future__ import annotations

import itertools
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..methods import MethodConfig, MethodContext
from ..runner.layerwise import LayerSolver, solve_layers
from .masks import Pattern, check_sparsity, parse_pattern, sparsity_summary, targets


class SparsityConfig(MethodConfig):
    """``sparsity`` (fraction pruned, unstructured) or ``pattern`` ("2:4", "4:8"); which
    layers: every Conv/Linear except the first and last (``dense_first``/``dense_last``, the
    usual protocol: the stem sees few inputs and the classifier is small) and depthwise convs
    (``dense_depthwise``: NVIDIA's ASP skips them too; an N:M pattern never fits them), ``exclude`` and
    ``ratios`` keyed like recipe overrides (fqn, ``re:regex``, type name, ``depthwise``)."""

    masks_weights: ClassVar[bool] = True
    sparsity: float | None = Field(None, description="fraction of weights pruned (unstructured)")
    pattern: str | None = Field(None, description="N:M, e.g. '2:4' (keep 2 of every 4 inputs)")
    dense_first: bool = Field(True, description="leave the first Conv/Linear dense")
    dense_last: bool = Field(True, description="leave the last Conv/Linear dense")
    dense_depthwise: bool = Field(
        True, description="leave depthwise convs dense (k·k weights per channel; on the zoo "
        "MobileNetV2, SparseGPT 50 % gives 56 % top-1 with them pruned, 81 % with them dense)")
    exclude: list[str] = Field(default_factory=list, description="layers left dense")
    ratios: dict[str, float] = Field(default_factory=dict,
                                     description="per-layer sparsity (unstructured)")
    allocation: Literal["uniform", "rd"] = Field(
        "uniform", description="uniform: every pruned layer at `sparsity`; rd: per-layer ratios "
        "by the rate-distortion DP (sparsity/rd.py) under the same global sparsity, written "
        "into `ratios` (and `exclude` for layers it leaves dense) when the method runs")
    rd_samples: int = Field(256, ge=1, description="calibration inputs rd measures on")

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None:
            check_sparsity(v)
        return v

    @field_validator("ratios")
    @classmethod
    def _ratio_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for key, r in v.items():
            check_sparsity(r, f"ratios[{key!r}]")
        return v

    @model_validator(mode="after")
    def _one_pattern(self):
        if self.sparsity is not None and self.pattern not in (None, "unstructured"):
            raise ValueError("give either sparsity (unstructured) or an N:M pattern, not both")
        if self.ratios and self.pattern not in (None, "unstructured"):
            raise ValueError("per-layer ratios apply to unstructured sparsity; an N:M pattern "
                             "has one ratio (1 - N/M)")
        if self.allocation == "rd" and (self.sparsity is None
                                        or self.pattern not in (None, "unstructured")):
            raise ValueError("allocation: rd spreads one unstructured sparsity over the layers: "
                             "give sparsity: S (e.g. 0.5) and no N:M pattern")
        if self.sparsity is None and self.pattern in (None, "unstructured") and not self.ratios:
            raise ValueError("give a sparsity (e.g. sparsity: 0.5) or a pattern (e.g. "
                             "pattern: '2:4')")
        parse_pattern(self.sparsity if self.sparsity is not None else 0.5, self.pattern)
        return self

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        """``allocation: rd`` without ratios yet: the DP's per-layer ratios (layers it leaves
        dense go to ``exclude``); a resolved config (ratios given) runs as it is."""
        if self.allocation != "rd" or self.ratios:
            return {}
        from .rd import rd_ratios
        ratios, _ = rd_ratios(model, self, ctx)
        return {"ratios": {f: r for f, r in ratios.items() if r > 0},
                "exclude": [*self.exclude, *(f for f, r in ratios.items() if r == 0)]}

    def pattern_obj(self) -> Pattern:
        default = self.sparsity if self.sparsity is not None else 0.5
        return parse_pattern(default, self.pattern)


def record(model, layer_stats: dict[str, Any], skipped: dict[str, str], **extra) -> dict:
    """A sparsity method's returned statistics: per-layer stats, the layers left dense (why),
    and the model's sparsity summary."""
    return {"layers": layer_stats, "skipped": skipped, "summary": sparsity_summary(model),
            **extra}


def prune_layerwise(model, cfg: SparsityConfig, ctx: MethodContext,
                    build: Callable[[Any, Pattern, float, int], "LayerSolver | str"],
                    sequential: str, desc: str) -> tuple[dict, dict, dict, dict[str, float]]:
    """A layer-wise sparsity method on the runner: ``build(layer, pattern, sparsity, seed)``
    makes the solver of each layer ``cfg`` prunes (or says why not). Returns the per-layer
    statistics, every layer left dense with its reason, the runner's statistics and each
    pruned layer's sparsity."""
    layers, skipped = targets(model, cfg)
    ratio = {f: s for f, _, s in layers}
    seeds = itertools.count(ctx.seed * 1_000_003)
    pattern = cfg.pattern_obj()

    def make(name: str, layer):
        if name not in ratio:
            return skipped.get(name, "not a pruned layer")
        return build(layer, pattern, ratio[name], next(seeds))
    out = solve_layers(model, ctx, make, sequential=sequential,
                       acts_on=ctx.recipe.activations is not None, desc=desc)
    return out.pop("layers"), {**skipped, **out.pop("skipped")}, out, ratio
