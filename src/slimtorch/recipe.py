"""Recipes: what to quantize, to how many bits, with which range estimator and method.

A recipe is a frozen pydantic model that loads from YAML. Errors name the offending key and
the YAML line. Built-in recipes ship as YAML files in ``slimtorch/recipes``; ``resolve_recipe``
accepts a Recipe, a built-in name (``w4a4``) or a path to a YAML file.

Per-layer assignment is an ordered map ``{fqn | "re:regex" | ModuleType -> LayerOverride |
None}``; ``None`` keeps the layer in float. The first match wins.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, ValidationError,
                      BeforeValidator, field_validator)

from .errors import RecipeError
from .quant.granularity import Granularity, parse_granularity

RECIPE_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8

GranularityField = Annotated[
    Any, BeforeValidator(parse_granularity), PlainSerializer(str, return_type=str)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_bits(v: int | None) -> int | None:
    if v is not None and not MIN_BITS <= v <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {v}")
    return v


class QuantSpec(_Strict):
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


class LayerOverride(_Strict):
    """Bit widths for matching layers. A missing key inherits; ``null`` keeps that part float."""

    weights: int | None = None
    activations: int | None = None

    _bits = field_validator("weights", "activations")(
        classmethod(lambda cls, v: _check_bits(v)))


class CalibConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    max_samples_per_quantizer: int = Field(1 << 18, ge=1024)


class Recipe(_Strict):
    """A complete quantization recipe."""

    version: int = RECIPE_VERSION
    name: str
    description: str = ""
    method: str = "rtn"
    method_args: dict[str, Any] = Field(default_factory=dict)
    weights: QuantSpec
    activations: QuantSpec | None = None
    first_layer: LayerOverride | None = None
    last_layer: LayerOverride | None = None
    overrides: dict[str, LayerOverride | None] = Field(default_factory=dict)
    quantize_matmuls: bool = True
    # residual adds read only by quantized layers (graph.capture._add_sites): quantize both
    # operands so integer engines keep the residual chain in int8 (on in the deployable w8a8;
    # off by default as in the BRECQ/QDrop protocol, which quantizes layer inputs only)
    quantize_adds: bool = False
    quantize_embeddings: bool = True
    fold_bn: bool = True
    calib: CalibConfig = Field(default_factory=CalibConfig)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is not supported (this slimtorch reads "
                             f"version {RECIPE_VERSION})")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from .algorithms import ALGORITHMS
        if v not in ALGORITHMS:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(sorted(ALGORITHMS))}")
        return v

    @field_validator("method_args")
    @classmethod
    def _method_args(cls, v: dict[str, Any], info) -> dict[str, Any]:
        from .algorithms import CONFIGS
        config = CONFIGS.get(info.data.get("method", ""))
        if config is not None:
            try:
                config.parse(v, info.data["method"])
            except RecipeError as e:
                raise ValueError(str(e)) from None
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(_format_errors(e, source, None)) from None


# ---------------------------------------------------------------- YAML with line numbers
def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict:
    """Map key paths to 1-based YAML line numbers (of the key, or of the value)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


def _format_errors(err: ValidationError, source: str, lines: dict | None) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        line = None
        if lines:
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
        where = f"{source} line {line}" if line else source
        if e["type"] == "extra_forbidden":
            what = f"unknown key {key!r}"
            parent = _model_at(loc[:-1])
            if parent is not None:
                what += f" (allowed here: {', '.join(parent.model_fields)})"
        elif e["type"] == "missing":
            what = f"missing required key {key!r}"
        else:
            what = f"bad value for {key!r}: {e['msg'].removeprefix('Value error, ')}"
        msgs.append(f"{where}: {what}")
    return "invalid recipe:\n  " + "\n  ".join(msgs)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that sits at ``loc`` inside a Recipe, if any."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return None
        sub = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return None
        model = sub[0]
    return model


def load_recipe_text(text: str, *, source: str = "recipe") -> Recipe:
    """Parse YAML (or JSON) text into a Recipe; errors name the key and line."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, _line_map(node))) from None


def builtin_recipe_names() -> list[str]:
    files = resources.files("slimtorch") / "recipes"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_builtin(name: str) -> Recipe:
    path = resources.files("slimtorch") / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes: "
                          f"{', '.join(builtin_recipe_names())}, or give a path to a YAML file")
    return load_recipe_text(path.read_text(), source=f"{name}.yaml")


def resolve_recipe(recipe: "Recipe | str | Path | dict") -> Recipe:
    """Accept a Recipe, a dict, a built-in name or a YAML file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return load_recipe_text(path.read_text(), source=path.name)
    return load_builtin(str(recipe))


def match_override(overrides: dict[str, Any], fqn: str, module_type: str) -> tuple[bool, Any]:
    """First entry of ``overrides`` matching a layer: exact fqn, ``re:REGEX`` or type name."""
    for key, value in overrides.items():
        if key.startswith("re:"):
            if re.fullmatch(key[3:], fqn):
                return True, value
        elif key == fqn or key == module_type:
            return True, value
    return False, None


def recipe_fingerprint(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)
