"""Spec types: how one tensor is quantized (``QuantSpec``) and per-layer bit overrides.

A leaf module (pydantic and ``granularity`` only): the recipe, the quantizers and the plan all
read these types, and none of them has to import another to get them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      field_validator)

from .granularity import Granularity, parse_granularity

MIN_BITS, MAX_BITS = 2, 8

GranularityField = Annotated[
    Any, BeforeValidator(parse_granularity), PlainSerializer(str, return_type=str)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_bits(v: int | None) -> int | None:
    if v is not None and not MIN_BITS <= v <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {v}")
    return v


class QuantSpec(Strict):
    """How one tensor is quantized: uniform, ``bits`` wide, with a range estimator."""

    bits: int
    symmetric: bool = False
    granularity: GranularityField = "per_tensor"
    observer: Literal["minmax", "percentile", "mse"] = "mse"
    p: float = Field(2.4, gt=0, description="norm of the MSE-p range search")
    percentile: float = Field(99.99, gt=50, le=100, description="for observer: percentile")
    # quantizer family (quant/kinds.py): uniform grid, log√2 (RepQ-ViT), twin-uniform (PTQ4ViT),
    # uniform after a per-channel affine (RepQ-ViT on a post-LN input)
    kind: Literal["uniform", "log2sqrt2", "twin_uniform", "reparam_uniform"] = "uniform"

    _bits = field_validator("bits")(classmethod(lambda cls, v: _check_bits(v)))

    @property
    def gran(self) -> Granularity:
        return self.granularity


class LayerOverride(Strict):
    """Bit widths for matching layers. A missing key inherits; ``null`` keeps that part float."""

    weights: int | None = None
    activations: int | None = None

    _bits = field_validator("weights", "activations")(
        classmethod(lambda cls, v: _check_bits(v)))
