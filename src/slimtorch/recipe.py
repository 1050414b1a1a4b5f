"""Recipes: what to quantize, to how many bits, with which range estimator and methods.

A recipe is a frozen pydantic model that loads from YAML. Errors name the offending key and
the YAML line. ``methods`` is an ordered list of registered method configs (``methods.py``),
each written ``- qdrop`` or ``- {name: qdrop, iters: 500}`` and validated once, here, into its
typed config; ``quantize`` runs them in order. The old one-method form ``method: qdrop`` +
``method_args: {...}`` (recipes and artifacts written before the list) is read as a
one-entry list. Built-in recipes ship as YAML files in ``slimtorch/recipes``; ``resolve_recipe``
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
from pydantic import (BaseModel, BeforeValidator, Field, PlainSerializer, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .errors import RecipeError, SlimtorchError
from .methods import MethodConfig, config_errors, method_entry, method_handler
from .quant.spec import LayerOverride, QuantSpec, Strict as _Strict  # noqa: F401 (re-export)

RECIPE_VERSION = 1

DATA_FREE_KEYS = ("method", "samples", "steps", "lr", "synth_batch_size", "stats", "shape")


class DiffusionCalib(_Strict):
    """Calibration of a diffusion noise predictor from its own sampling trajectory
    (``diffusion.calibration``): ``timesteps`` single | ptq4dm | uniform picks the (x_t, t)
    pairs among the steps ``sampler`` (ddim | ddpm) visits in ``steps`` steps of the
    ``num_train_timesteps`` schedule; ``mu``/``sigma``: PTQ4DM's normal over t/T; ``every``:
    Q-Diffusion's stride over the sampler's steps; ``time_layers: all`` calibrates the layers
    that read only t over every time step."""
    timesteps: Literal["single", "ptq4dm", "uniform"] = "uniform"
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    num_train_timesteps: int = Field(1000, ge=2)
    mu: float = 0.4
    sigma: float = Field(0.4, gt=0)
    every: int = Field(5, ge=1)
    time_layers: Literal["all", "calib"] = "all"

    @model_validator(mode="after")
    def _fits_schedule(self) -> "DiffusionCalib":
        visited = self.num_train_timesteps if self.sampler == "ddpm" else self.steps
        if self.steps > self.num_train_timesteps:
            raise ValueError(f"steps = {self.steps} calibration time steps is more than the "
                             f"schedule's {self.num_train_timesteps}: lower steps (DDIM "
                             "typically 50)")
        if self.timesteps == "uniform" and self.every > visited:
            raise ValueError(f"every = {self.every} is larger than the sampler's {visited} "
                             "steps: lower it")
        return self


class CalibConfig(_Strict):
    """Where calibration data comes from and how it is batched. ``source: data-free``
    synthesises it from the float model (``data.synthetic``): ``method`` auto | bn-stats |
    psaq, ``samples`` inputs of one-sample ``shape`` (the CLI fills it from the zoo entry),
    ``steps``/``lr`` (``auto``: the method's published defaults), optimised in batches of
    ``synth_batch_size``, BN statistics per ``sample`` (ZeroQ) or per ``batch``."""
    batch_size: int = Field(32, ge=1)
    max_samples_per_quantizer: int = Field(1 << 18, ge=1024)
    source: Literal["data", "data-free", "diffusion"] = "data"
    diffusion: DiffusionCalib | None = None  # source: diffusion (None there: the defaults)
    method: Literal["auto", "bn-stats", "psaq"] = "auto"
    samples: int = Field(256, ge=1)
    steps: int | Literal["auto"] = "auto"
    lr: float | Literal["auto"] = "auto"
    synth_batch_size: int = Field(32, ge=1)
    stats: Literal["sample", "batch"] = "sample"
    shape: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _data_free_keys(self) -> "CalibConfig":
        given = [k for k in DATA_FREE_KEYS  # a dump holds the defaults: it round-trips
                 if getattr(self, k) != type(self).model_fields[k].default]
        if self.source == "data" and given:
            raise ValueError(f"{', '.join(given)} apply to data-free calibration only: add "
                             "`source: data-free` or drop them")
        if self.source == "diffusion":
            extra = [k for k in given if k not in ("samples", "shape")]
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to data-free calibration, not to "
                                 "`source: diffusion`: drop them")
            if self.diffusion is None:
                self.diffusion = DiffusionCalib()
        elif self.diffusion is not None:
            raise ValueError("`diffusion:` settings need `source: diffusion`: add it or drop "
                             "them")
        if isinstance(self.steps, int) and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or auto), got {self.steps}")
        return self

    def data_free_args(self) -> dict[str, Any]:
        """Keyword arguments of ``data.synthetic.synthesize`` (shape and n excepted)."""
        return {"method": self.method, "steps": self.steps, "lr": self.lr,
                "batch_size": self.synth_batch_size, "stats": self.stats}


class MixedConfig(_Strict):
    """Per-layer weight bits chosen from the weights alone when the model is prepared
    (``quant.allocate.coding_length_bits``): Attention Round's lossy coding length with the
    DP under an average of ``avg_bits`` over the weight-quantized layers (first and last
    included: their weight bits are allocated too). The resolved per-layer ``overrides`` are
    what the artifact records."""
    criterion: Literal["coding_length"] = "coding_length"
    avg_bits: float = Field(gt=0)
    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    eps: float = Field(0.5, gt=0, description="ε of the coding length, × rms(W) of the layer")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        from .quant.spec import MAX_BITS, MIN_BITS
        if not v or any(not MIN_BITS <= b <= MAX_BITS for b in v):
            raise ValueError(f"bits must be a non-empty list within {MIN_BITS}..{MAX_BITS}")
        return tuple(sorted(set(v)))


def _parse_method(v: Any) -> MethodConfig:
    """One ``methods`` entry (a name, or a mapping with ``name``) → its typed config."""
    if isinstance(v, MethodConfig):
        return v
    if isinstance(v, str):
        v = {"name": v}
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        raise ValueError("each entry of methods is a method name or a mapping with a 'name', "
                         "e.g. `- qdrop` or `- {name: qdrop, iters: 500}`")
    try:
        handler = method_handler(v["name"])
    except RecipeError as e:
        raise ValueError(str(e)) from None
    try:
        return handler.config.model_validate({k: x for k, x in v.items() if k != "name"})
    except ValidationError as e:
        errs = config_errors(e, handler.config)
        raise PydanticCustomError("method_config", "{detail}", {
            "detail": "; ".join(m for _, m in errs), "method": handler.name,
            "errors": [[list(loc), m] for loc, m in errs]}) from None


MethodField = Annotated[Any, BeforeValidator(_parse_method), PlainSerializer(method_entry)]


class Recipe(_Strict):
    """A complete quantization recipe."""

    version: int = RECIPE_VERSION
    name: str
    description: str = ""
    methods: list[MethodField] = Field(default_factory=lambda: ["rtn"])
    weights: QuantSpec | None = None  # None: weights stay float (a sparsity-only recipe)
    activations: QuantSpec | None = None
    first_layer: LayerOverride | None = None
    last_layer: LayerOverride | None = None
    overrides: dict[str, LayerOverride | None] = Field(default_factory=dict)
    mixed: MixedConfig | None = None  # per-layer weight bits from the coding length
    quantize_matmuls: bool = True
    # residual adds read only by quantized layers (graph.capture._add_sites): quantize both
    # operands so integer engines keep the residual chain in int8 (on in the deployable w8a8;
    # off by default as in the BRECQ/QDrop protocol, which quantizes layer inputs only)
    quantize_adds: bool = False
    quantize_embeddings: bool = True
    fold_bn: bool = True
    # a Conv/Linear that reads a channel concatenation gets one layer (own input quantizer and
    # weight slice) per part: W·cat(x₁, x₂) = W₁x₁ + W₂x₂ (Q-Diffusion's shortcut splitting)
    split_concat: bool = False
    calib: CalibConfig = Field(default_factory=CalibConfig)

    @field_validator("weights")
    @classmethod
    def _static_weights(cls, v: QuantSpec | None) -> QuantSpec | None:
        if v is not None and v.dynamic:
            raise ValueError("weights are quantized once, not at run time: `dynamic` and "
                             "per_token apply to activations only")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is not supported (this slimtorch reads "
                             f"version {RECIPE_VERSION})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_method_form(cls, data: Any) -> Any:
        """``method: M`` + ``method_args: {...}`` (the form before ``methods``) → one entry."""
        if not isinstance(data, dict) or not {"method", "method_args"} & data.keys():
            return data
        if "methods" in data:
            raise ValueError("give `methods:` only (`method:` / `method_args:` is the old form "
                             "of a one-entry list)")
        data = dict(data)
        args = data.pop("method_args", None) or {}
        if not isinstance(args, dict):
            raise ValueError("method_args must be a mapping of settings")
        data["methods"] = [{"name": data.pop("method", "rtn"), **args}]
        return data

    @model_validator(mode="after")
    def _compresses_something(self) -> "Recipe":
        structural = [m.structural for m in self.methods]
        if (self.weights is None and self.activations is None and not self.masks_weights
                and not any(structural)):
            raise ValueError("the recipe compresses nothing: give `weights:` (e.g. {bits: 4}) "
                             "and/or a sparsity method in `methods:` (e.g. {name: wanda, "
                             "sparsity: 0.5}) or a pruning method ({name: prune})")
        if structural != sorted(structural, reverse=True):
            raise ValueError("structural methods (prune, recover) change the model's shape "
                             "and run on the float model first: list them before the others")
        return self

    @property
    def masks_weights(self) -> bool:
        """Whether one of the methods puts masks on weights (a sparsity method)."""
        return any(m.masks_weights for m in self.methods)

    @property
    def method_names(self) -> list[str]:
        return [method_entry(m)["name"] for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "recipe") -> "Recipe":
        return validate_model(data, cls, source=source, what="recipe")


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


def _format_errors(err: ValidationError, source: str, lines: dict | None,
                   root: type[BaseModel] | None = None, title: str = "invalid recipe") -> str:
    """One line per error of ``err``, each with its key and YAML line; ``root`` is the model
    the keys are relative to (None: Recipe)."""
    msgs = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        line = _line_of(loc, lines)
        where = f"{source} line {line}" if line else source
        if e["type"] == "method_config":
            msgs += _method_errors(e, loc, source, lines)
            continue
        if e["type"] == "extra_forbidden":
            what = f"unknown key {key!r}"
            parent = _model_at(loc[:-1], root or Recipe)
            if parent is not None:
                what += f" (allowed here: {', '.join(parent.model_fields)})"
        elif e["type"] == "missing":
            what = f"missing required key {key!r}"
        else:
            what = f"bad value for {key!r}: {e['msg'].removeprefix('Value error, ')}"
        msgs.append(f"{where}: {what}")
    return f"{title}:\n  " + "\n  ".join(msgs)


def _line_of(loc: tuple, lines: dict | None) -> int | None:
    for n in range(len(loc), -1, -1):
        if lines and loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _method_errors(e: dict, loc: tuple, source: str, lines: dict | None) -> list[str]:
    """One message per bad setting of a ``methods`` entry, each with its own line."""
    out = []
    for sub, msg in e["ctx"]["errors"]:
        line = _line_of(loc + tuple(sub), lines)
        where = f"{source} line {line}" if line else source
        out.append(f"{where}: methods[{loc[-1]}] ({e['ctx']['method']}): {msg}")
    return out


def _alias_one_method_form(lines: dict) -> dict:
    """Lines of ``method`` / ``method_args.K`` also under ``methods.0`` / ``methods.0.K``."""
    if ("methods",) in lines or not {("method",), ("method_args",)} & lines.keys():
        return lines
    top = lines.get(("method_args",), lines.get(("method",)))
    lines[("methods",)] = lines[("methods", 0)] = top
    for path, line in list(lines.items()):
        if path[:1] == ("method_args",) and len(path) > 1:
            lines[("methods", 0) + path[1:]] = line
    return lines


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that sits at ``loc`` inside ``root``, if any."""
    model: type[BaseModel] = root
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
    return load_yaml_model(text, Recipe, source=source, what="recipe")


def load_yaml_model(text: str, cls: type[BaseModel], *, source: str, what: str,
                    error: type[SlimtorchError] = RecipeError) -> Any:
    """Parse YAML (or JSON) text into the pydantic model ``cls`` (a Recipe, a sweep spec);
    every error is one ``error`` naming the key and its line in ``source``."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark else source
        raise error(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise error(f"{source}: a {what} must be a mapping of keys to values, "
                    f"got {type(data).__name__}")
    lines = _line_map(node)
    if cls is Recipe:
        lines = _alias_one_method_form(lines)
    return validate_model(data, cls, source=source, what=what, error=error, lines=lines)


def validate_model(data: Any, cls: type[BaseModel], *, source: str, what: str,
                   error: type[SlimtorchError] = RecipeError, lines: dict | None = None) -> Any:
    """``cls.model_validate(data)``; every validation error is one ``error`` naming the key
    (and its YAML line when ``lines`` maps key paths to lines)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise error(_format_errors(e, source, lines, cls, f"invalid {what}")) from None


def builtin_recipe_names() -> list[str]:
    files = resources.files("slimtorch") / "recipes"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_builtin(name: str) -> Recipe:
    path = resources.files("slimtorch") / "recipes" / f"{name}.yaml"
    if not path.is_file():
        short = sparsity_shorthand(name) or pruning_shorthand(name)
        if short is not None:
            return short
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes: "
                          f"{', '.join(builtin_recipe_names())}, sparsity names like 50-wanda "
                          "or 2:4-sparsegpt, pruning names like macs-0.5-taylor, or give a path to a "
                          "YAML file")
    return load_recipe_text(path.read_text(), source=f"{name}.yaml")


_SHORT_SPARSITY = re.compile(r"(?:(\d+(?:\.\d+)?)|(\d+:\d+))-([a-z][a-z0-9_]*?)(-rd)?")


def sparsity_shorthand(name: str) -> Recipe | None:
    """``PCT-METHOD`` (unstructured, e.g. ``50-wanda``) or ``N:M-METHOD`` (``2:4-sparsegpt``)
    as a float-weight recipe running that sparsity method with its defaults, ``-rd`` appended
    for layer-adaptive ratios (``50-sparsegpt-rd``: ``allocation: rd``); None when the name is
    not of that form or METHOD is not a sparsity method."""
    m = _SHORT_SPARSITY.fullmatch(name)
    if m is None:
        return None
    pct, nm, method, rd = m.groups()
    try:
        handler = method_handler(method)
    except RecipeError:
        return None
    if not handler.config.masks_weights:
        return None
    entry = {"name": method, **({"pattern": nm} if nm else {"sparsity": float(pct) / 100}),
             **({"allocation": "rd"} if rd else {})}
    what = (f"N:M {nm}" if nm else f"{pct} % unstructured") + (
        ", layer-adaptive ratios (rate-distortion DP)" if rd else "")
    return Recipe.from_dict({"name": name, "methods": [entry], "weights": None,
                             "description": f"{method} sparsity, {what}, float weights"},
                            source=name)


_SHORT_PRUNING = re.compile(
    r"(macs|params)-(0?\.\d+)-(magnitude|taylor|random|lowrank|hesso)(-rd)?(-kd)?")


def pruning_shorthand(name: str) -> Recipe | None:
    """``macs-0.5-taylor`` (keep 50 % of MACs, Taylor criterion; ``macs-0.5-lowrank``: SVD
    factorisation, ranks by the rate-distortion DP; ``macs-0.5-hesso``: HESSO's progressive
    pruning over 1 epoch of distillation; ``-rd`` chooses per-group amounts by the
    rate-distortion DP; ``-kd`` adds a 1-epoch distillation recovery) as a float-weight
    structured-pruning recipe."""
    m = _SHORT_PRUNING.fullmatch(name)
    if m is None:
        return None
    metric, ratio, criterion, rd, kd = m.groups()
    if criterion in ("lowrank", "hesso"):  # their own allocation: -rd is not a variant
        if rd:
            return None
        methods = [{"name": criterion, "target": {metric: float(ratio)}}]
    else:
        methods = [{"name": "prune", "criterion": criterion, "target": {metric: float(ratio)},
                    **({"allocation": "rd"} if rd else {})}]
    methods += [{"name": "recover", "epochs": 1}] if kd else []
    return Recipe.from_dict({"name": name, "methods": methods, "weights": None,
                             "description": f"structured pruning to {ratio} of the {metric} "
                             f"({criterion}{', layer-adaptive by the rate-distortion DP' if rd else ''})"
                             f"{', 1 epoch KD recovery' if kd else ''}"},
                            source=name)


def is_recipe_file(name: "str | Path") -> bool:
    """Whether ``name`` names a recipe file (YAML or JSON) rather than a built-in recipe."""
    return Path(name).suffix in (".yaml", ".yml", ".json")


def resolve_recipe(recipe: "Recipe | str | Path | dict") -> Recipe:
    """Accept a Recipe, a dict, a built-in name or a YAML file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if is_recipe_file(path) or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return load_recipe_text(path.read_text(), source=path.name)
    return load_builtin(str(recipe))


def match_override(overrides: dict[str, Any], fqn: str, module_type: str,
                   depthwise: bool = False) -> tuple[bool, Any]:
    """First entry of ``overrides`` matching a layer: exact fqn, ``re:REGEX``, type name, or
    ``depthwise`` (a convolution with one group per input channel)."""
    for key, value in overrides.items():
        if key.startswith("re:"):
            if re.fullmatch(key[3:], fqn):
                return True, value
        elif key == fqn or key == module_type or (depthwise and key == "depthwise"):
            return True, value
    return False, None


def recipe_fingerprint(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)
