"""Spec types: how one tensor is quantized (``QuantSpec``) and per-layer bit overrides.

A leaf module (pydantic and ``granularity`` only): the recipe, the quantizers and the plan all
read these types, and none of them has to import another to get them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      field_validator, model_serializer, model_validator)

from .granularity import Granularity, PerGroup, PerToken, parse_granularity

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
    # quantizer family (quant/kinds.py): uniform grid, log√2 (RepQ-ViT), plain log2 (Agile-Quant),
    # twin-uniform (PTQ4ViT), uniform after a per-channel affine (RepQ-ViT on a post-LN input)
    kind: Literal["uniform", "log2sqrt2", "log2", "twin_uniform", "reparam_uniform"] = "uniform"
    # activations only: the range is taken from the tensor itself at run time (min/max of each
    # token for per_token, of the whole tensor for per_tensor), nothing is calibrated or stored
    # — SmoothQuant's per-token dynamic activations. ``per_token`` implies it.
    dynamic: bool = False

    _bits = field_validator("bits")(classmethod(lambda cls, v: _check_bits(v)))

    @model_validator(mode="before")
    @classmethod
    def _dynamic_defaults(cls, data: Any) -> Any:
        """per_token means dynamic; a dynamic range is the run-time min/max (no observer)."""
        if not isinstance(data, dict):
            return data
        gran = data.get("granularity")
        per_token = isinstance(gran, PerToken) or str(gran).replace(" ", "") == "per_token"
        if per_token:
            if data.get("dynamic") is False:
                raise ValueError("per_token activations are computed at run time: drop "
                                 "`dynamic: false` (or use per_tensor for a calibrated range)")
            data = {**data, "dynamic": True}
        if data.get("dynamic"):
            if data.get("observer", "minmax") != "minmax":
                raise ValueError(f"a dynamic range is the tensor's own min/max at run time; "
                                 f"observer {data['observer']!r} does not apply: drop it")
            if data.get("kind", "uniform") != "uniform":
                raise ValueError("dynamic ranges need kind: uniform")
            if isinstance(parse_granularity(gran or "per_tensor"), PerGroup):
                raise ValueError("dynamic ranges are per_token or per_tensor")
            data = {**data, "observer": "minmax"}
        return data

    @property
    def gran(self) -> Granularity:
        return self.granularity


class LayerOverride(Strict):
    """Bit widths for matching layers. A missing key inherits; ``null`` keeps that part float.
    A dump holds only the keys that were given, so a missing key stays missing (inherits) when
    the dump is read again instead of becoming ``null`` (float)."""

    weights: int | None = None
    activations: int | None = None

    @model_serializer(mode="wrap")
    def _given_keys(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    _bits = field_validator("weights", "activations")(
        classmethod(lambda cls, v: _check_bits(v)))
