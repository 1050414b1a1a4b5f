"""The method registry: a config type → its handler (torchao's ``transform_module`` registry).

A method is one module: a config class (a ``MethodConfig``) and an entry function registered
under the name recipes use::

    class QDropConfig(MethodConfig): ...

    @register_method("qdrop", QDropConfig)
    def apply(model, cfg: QDropConfig, ctx: MethodContext) -> dict: ...

A recipe's ``methods:`` list holds typed configs, validated once when the recipe is read;
``quantize`` runs them in order. Before a method runs, its config is ``resolve``-d: every
``auto`` becomes the value it stands for on this model and recipe, and that resolved config is
what the method gets and what the artifact and ``metrics.json`` record. ``apply`` returns its
decisions and statistics as plain data.

Modules register themselves when imported; the registry imports every module of
``METHOD_PACKAGES`` on the first lookup, so adding a method edits no table. This module is a
leaf (pydantic and ``errors`` only), so recipes can validate method configs without importing
the algorithms at import time.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError

METHOD_PACKAGES = ("slimtorch.algorithms", "slimtorch.sparsity", "slimtorch.prune")  # where methods live


class MethodConfig(BaseModel):
    """Base of every method's config. Unknown keys and bad values are errors that name the key
    and the allowed keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # the method puts masks on weights (sparsity): the plan gives every Conv/Linear a twin
    masks_weights: ClassVar[bool] = False
    # the method trains weights on training data (``MethodContext.train_batches``): the
    # pipeline loads the task's training split only when a recipe has such a method
    trains: ClassVar[bool] = False
    # the method changes the model's structure (structured pruning, its recovery): it runs on
    # the float model before quantization is prepared, and ``slimtorch.load`` replays it
    structural: ClassVar[bool] = False
    # the method removes structure (channels, ranks): its stats hold ``params`` and ``macs``
    # before/after and a replayable ``history`` (``slimtorch.prune.pruning_record``)
    shrinks: ClassVar[bool] = False

    @classmethod
    def parse(cls, args: dict[str, Any] | None, method: str) -> "MethodConfig":
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise RecipeError(f"invalid settings for method {method!r}: "
                              + "; ".join(m for _, m in config_errors(e, cls))) from None

    def auto_values(self, model, ctx: "MethodContext") -> dict[str, Any]:
        """{field: value} for every field set to ``auto`` (override in configs that have any)."""
        return {}

    def resolve(self, model, ctx: "MethodContext") -> "MethodConfig":
        """This config with every ``auto`` replaced by its value for ``model`` (and the recipe
        and data in ``ctx``)."""
        values = self.auto_values(model, ctx)
        return self.model_copy(update=values) if values else self


def config_errors(err: ValidationError, cls: type[MethodConfig]) -> list[tuple[tuple, str]]:
    """(location inside the config, message) of each error of a config's validation."""
    out = []
    for x in err.errors():
        key = ".".join(map(str, x["loc"]))
        if x["type"] == "extra_forbidden":
            msg = f"unknown key {key!r} (allowed: {', '.join(cls.model_fields) or 'none'})"
        else:
            msg = f"bad value for {key!r}: {x['msg'].removeprefix('Value error, ')}"
        out.append((tuple(x["loc"]), msg))
    return out


@dataclass(frozen=True)
class MethodContext:
    """What a method may use besides the model it transforms and its config."""

    recipe: Any                   # the Recipe
    batches: list                 # calibration items (each one forward)
    seed: int = 0
    progress: bool = False
    float_model: Any = None       # the untouched float model (BN not folded); None if inplace
    work_dir: Any = None          # resumable state of this method, or None
    train_batches: list | None = None  # training items for methods that train (``trains``)


@dataclass(frozen=True)
class MethodHandler:
    name: str
    config: type[MethodConfig]
    apply: Callable[..., dict]


_BY_NAME: dict[str, MethodHandler] = {}
_BY_CONFIG: dict[type, MethodHandler] = {}
_discovered = False


def register_method(name: str, config: type[MethodConfig]) -> Callable:
    """Decorator: register ``apply(model, cfg, ctx) -> dict`` as method ``name``."""
    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        old = _BY_NAME.get(name)
        if old is not None and (old.config, old.apply.__qualname__) != (config, fn.__qualname__):
            raise RuntimeError(f"method {name!r} is registered twice")
        if config in _BY_CONFIG and _BY_CONFIG[config].name != name:
            raise RuntimeError(f"{config.__name__} already belongs to method "
                               f"{_BY_CONFIG[config].name!r}; subclass it for {name!r}")
        _BY_NAME[name] = _BY_CONFIG[config] = MethodHandler(name, config, fn)
        return fn
    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for pkg_name in METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
            importlib.import_module(info.name)


def method_names() -> list[str]:
    _discover()
    return sorted(_BY_NAME)


def method_handler(name: str) -> MethodHandler:
    _discover()
    if name not in _BY_NAME:
        raise RecipeError(f"unknown method {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def handler_for(config: MethodConfig) -> MethodHandler:
    """The handler registered for this config's type."""
    _discover()
    if type(config) not in _BY_CONFIG:
        raise RecipeError(f"{type(config).__name__} is not a registered method config")
    return _BY_CONFIG[type(config)]


def method_entry(config: MethodConfig) -> dict[str, Any]:
    """A config as it appears in a recipe: ``{name: qdrop, iters: 500, ...}``."""
    return {"name": handler_for(config).name, **config.model_dump(mode="json")}
