"""Public entry points: ``quantize``, ``sparsify``, ``save``, ``load``, ``export_onnx``.

``quantize`` composes small steps: resolve the recipe → check the calibration data → copy and
prepare the model (rewrite, capture, plan, attach quantizers) → calibrate → run the recipe's
methods in order (``run_methods``) → freeze the integer weights.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data.calibration import calibration_batches
from .eval.selfcheck import CheckReport, check, default_floor, enforce
from .export.artifact import load, save
from .methods import MethodContext, handler_for
from .quant.prepare import META_ATTR, calibrate, freeze, prepare, sync_shared
from .errors import RecipeError
from .recipe import Recipe, resolve_recipe

__all__ = ["quantize", "prune", "sparsify", "save", "load", "export_onnx", "inspect",
           "sensitivity", "allocate"]


def quantize(model: nn.Module, recipe: Recipe | str | dict, calib_data: Any = None, *,
             seed: int = 0, progress: bool = False, work_dir: str | None = None,
             inplace: bool = False, transform: Callable[[Any], Any] | None = None,
             self_check: bool = True,
             strict: bool = False, min_sqnr_db: float | None = None,
             max_samples: int | None = None, train_data: Any = None,
             on_method: Callable[[str, nn.Module], dict] | None = None) -> nn.Module:
    """Return a quantized copy of ``model`` (same forward signature; the input is untouched).

    calib_data: a Tensor of samples, or any iterable of items (a list, a generator, a torch
    ``DataLoader``) — a Tensor (one positional argument), a tuple (positional arguments) or a
    dict (keyword arguments); None with a data-free recipe (``calib.source: data-free``), which
    synthesises ``calib.samples`` inputs from the float model (``data.synthetic``).
    ``transform`` maps each item to the model's input first, e.g. ``lambda batch: batch[0]``
    for a loader of (images, labels). ``max_samples``: read the
    iterable only until that many samples are in (NNCF's ``subset_size``).
    work_dir: where reconstruction methods keep per-unit state; a rerun with the same recipe,
    seed and data resumes after the last finished unit.
    self_check: compare quantized and float outputs (and every layer's SQNR) on the first
    calibration batch (``eval.selfcheck``); below ``min_sqnr_db`` (default by bit width: 6 dB
    at 8 bits, 0 dB below) it warns, or with
    ``strict=True`` raises ``QuantizationCheckError``. The report is in the artifact metadata
    (``self_check``) and in ``metrics.json``. Not run with ``inplace=True`` (no float model is
    left to compare with).
    inplace: quantize ``model`` itself instead of a copy (no second copy of a large model);
    methods that need the untouched float model (PD-Quant's distribution correction) refuse.
    train_data: training data for methods that train (``srste``), in any form ``calib_data``
    takes (``transform`` applies too); None: they train on the calibration batches.
    Structural methods (``prune``, ``recover``) run first, on the float copy; the pruned float
    model is then what quantization methods and the self-check compare with, and its pruning
    history is in the metadata (``pruning``). ``on_method(name, model)``, if given, is called
    after each structural method and its returned dict is kept in that method's record
    (``eval``): the pipeline measures accuracy before and after recovery with it.
    The caller's global RNG is left as it was: every random draw uses a generator seeded from
    ``seed``.
    """
    recipe = resolve_recipe(recipe)
    synthetic: dict[str, Any] = {}
    if recipe.calib.source != "data":  # data-free / diffusion: made from the float model
        calib_data = _synthesize_for(model, recipe, calib_data, seed, progress, synthetic)
    batches = calibration_batches(calib_data, recipe.calib.batch_size, transform, max_samples)
    train = (None if train_data is None else
             calibration_batches(train_data, recipe.calib.batch_size, transform))
    with torch.random.fork_rng(devices=[]):  # module constructors in rewrites draw from it
        qmodel = (model if inplace else copy.deepcopy(model)).eval()
        structural = run_methods(qmodel, recipe, batches, seed=seed, progress=progress,
                                 float_model=None if inplace else model, work_dir=work_dir,
                                 train_batches=train, structural=True, on_method=on_method)
        reference = model
        if structural:  # pruned: later methods and the self-check compare with its float self
            reference = None if inplace else copy.deepcopy(qmodel).eval()
        meta = prepare(qmodel, recipe, batches[0], seed=seed)
        calibrate(qmodel, batches, progress=progress)
        if recipe.calib.source == "diffusion" and recipe.calib.diffusion.time_layers == "all":
            synthetic["time_layers"] = _calibrate_time_layers(qmodel, recipe, batches[0])
        meta["methods"] = structural + run_methods(
            qmodel, recipe, batches, seed=seed, progress=progress,
            float_model=None if inplace else reference, work_dir=work_dir, train_batches=train)
        if structural:
            meta["pruning"] = {"steps": [r["stats"]["history"] for r in structural
                                         if "history" in r["stats"]]}
    if synthetic:
        meta["calibration"] = synthetic  # data-free: resolved settings, final losses
    sync_shared(qmodel, meta["plan"])
    freeze(qmodel)
    setattr(qmodel, META_ATTR, meta)
    if self_check and not inplace:
        floor = default_floor(recipe) if min_sqnr_db is None else min_sqnr_db
        report = check(qmodel, reference, batches[0], min_sqnr_db=floor, meta=meta)
        meta["self_check"] = report.to_dict(worst=8)
        enforce(report, strict=strict, sparse=recipe.masks_weights)
    return qmodel


def sparsify(model: nn.Module, recipe: Recipe | str | dict, calib_data: Any = None, **kwargs
             ) -> nn.Module:
    """Return a sparse copy of ``model``: ``quantize`` with a recipe whose methods put masks on
    weights (``magnitude``, ``random``, ``wanda``, ``sparsegpt``; names like ``50-wanda`` or
    ``2:4-sparsegpt`` build one). If the recipe also quantizes (``weights:``), the masked
    weights are quantized and stay exactly zero. ``calib_data``: as for ``quantize``; the
    data-free methods (magnitude, random) need one example batch to capture the graph.
    ``slimtorch.sparsity.masks_of(model)`` gives the masks; ``metrics.json`` of the CLI holds
    the sparsity per layer. ``train_data=`` feeds recovery methods (``srste`` after a
    one-shot method: ``[{name: sparsegpt, pattern: '2:4'}, {name: srste, epochs: 3}]``)."""
    return quantize(model, sparsity_recipe(recipe), calib_data, **kwargs)


def prune(model: nn.Module, recipe: Recipe | str | dict, calib_data: Any = None, **kwargs
          ) -> nn.Module:
    """Return a structurally pruned copy of ``model`` — a physically smaller ``nn.Module``
    (smaller Conv/Linear/BatchNorm layers): ``quantize`` with a recipe that has a ``prune``
    method (names like ``macs-0.5-taylor``, ``macs-0.5-taylor-kd``, or ``methods: [{name:
    prune, criterion: taylor, target: {macs: 0.5}}, {name: recover, epochs: 1}, ...]``; a
    quantization recipe's settings after it quantize the pruned model, e.g. the built-in
    ``macs-0.5-taylor-w8a8``), ``hesso`` (``macs-0.5-hesso``: prunes progressively while it
    distils) or ``lowrank``. ``calib_data`` gives the graph's example and the Taylor
    gradients; ``train_data=`` feeds ``recover`` and ``hesso`` (distillation from ``model``). The pruning
    history is in the artifact (``slimtorch.save``); ``slimtorch.load`` replays it on the
    base model. ``slimtorch.prune.pruning_record(model)`` gives params, MACs and groups."""
    return quantize(model, pruning_recipe(recipe), calib_data, **kwargs)


def pruning_recipe(recipe: Recipe | str | dict) -> Recipe:
    """The recipe, if it has a method that shrinks the model (``prune``, ``hesso``,
    ``lowrank``); else a RecipeError."""
    recipe = resolve_recipe(recipe)
    if not any(m.shrinks for m in recipe.methods):
        raise RecipeError(f"recipe {recipe.name!r} has no prune method (its methods: "
                          f"{', '.join(recipe.method_names)}): add {{name: prune, target: "
                          "{macs: 0.5}}, or use a name like macs-0.5-taylor, macs-0.5-hesso or "
                          "macs-0.5-lowrank")
    return recipe


def sparsity_recipe(recipe: Recipe | str | dict) -> Recipe:
    """The recipe, if one of its methods puts masks on weights; else a RecipeError."""
    recipe = resolve_recipe(recipe)
    if not recipe.masks_weights:
        from .methods import method_handler, method_names
        sparse = [n for n in method_names() if method_handler(n).config.masks_weights]
        raise RecipeError(f"recipe {recipe.name!r} has no sparsity method (its methods: "
                          f"{', '.join(recipe.method_names)}): add one of {', '.join(sparse)}, "
                          "or use quantize")
    return recipe

def _synthesize_for(model: nn.Module, recipe: Recipe, calib_data: Any, seed: int,
                    progress: bool, report: dict) -> Any:
    """The recipe's calibration set made from the float model: synthetic inputs
    (``calib: {source: data-free, ...}``) or (x_t, t) pairs from a diffusion model's own
    sampling trajectory (``source: diffusion``, ``diffusion.calibration``)."""
    from .data.synthetic import synthesize
    from .errors import CalibrationDataError
    c = recipe.calib
    if calib_data is not None:
        raise CalibrationDataError(
            f"the recipe makes its calibration set from the model (calib.source: {c.source}) "
            "and calibration data was given too: pass calib_data=None, or drop "
            f"`source: {c.source}` to calibrate on the data (a saved set is such data)")
    if c.source == "diffusion":
        from .diffusion.calibration import calibration_set
        return calibration_set(model, c.diffusion, c.samples, c.batch_size, seed=seed,
                               shape=c.shape, progress=progress, report=report)
    if c.shape is None:
        raise CalibrationDataError(
            "data-free calibration needs the shape of one input sample: set `calib: {shape: "
            "[1, 28, 28]}` in the recipe, or make the set with "
            "slimtorch.data.synthetic.synthesize(model, shape, n) and pass it as calib_data")
    return synthesize(model, c.shape, c.samples, seed=seed, progress=progress, report=report,
                      **c.data_free_args())


def _calibrate_time_layers(qmodel: nn.Module, recipe: Recipe, example: Any) -> list[str]:
    from .diffusion.calibration import calibrate_time_layers
    from .graph.capture import graph_of
    return calibrate_time_layers(qmodel, graph_of(qmodel, example), example,
                                 recipe.calib.diffusion.num_train_timesteps)


def inspect(qmodel: nn.Module, float_model: nn.Module, inputs: Any) -> CheckReport:
    """Per-layer SQNR of ``qmodel`` against ``float_model`` on one input item (Tensor, tuple of
    positional arguments or dict of keywords): ``report.table(None)`` prints every layer,
    ``report.worst()`` the layers with the largest own error (``eval.selfcheck``)."""
    return check(qmodel, float_model, inputs)


def run_methods(model: nn.Module, recipe: Recipe, batches: list, *, seed: int = 0,
                progress: bool = False, float_model: nn.Module | None = None,
                work_dir: str | Path | None = None,
                train_batches: list | None = None, structural: bool = False,
                on_method: Callable[[str, nn.Module], dict] | None = None
                ) -> list[dict[str, Any]]:
    """Run the recipe's methods in order, each on its config with every ``auto`` resolved:
    the structural ones (``structural=True``) or the others. Returns one record per method:
    name, the resolved config, what ``auto`` became, and the decisions/statistics the method
    returned (kept in the artifact and metrics.json)."""
    records = []
    for i, cfg in enumerate(recipe.methods):
        if cfg.structural != structural:
            continue
        handler = handler_for(cfg)
        ctx = MethodContext(recipe, batches, seed, progress, float_model,
                            None if work_dir is None else Path(work_dir) / f"{i}-{handler.name}",
                            train_batches)
        resolved = cfg.resolve(model, ctx)
        stats = handler.apply(model, resolved, ctx)
        records.append({"name": handler.name, "config": resolved.model_dump(mode="json"),
                        "auto": {k: getattr(resolved, k) for k, v in cfg if v == "auto"},
                        "stats": stats})
        if on_method is not None:
            records[-1]["eval"] = on_method(handler.name, model)
    return records


def export_onnx(qmodel: nn.Module, path, example_inputs: Any, **kwargs):
    """ONNX QDQ export checked by onnxruntime (``export.onnx.export_onnx``; needs the
    ``export`` extra: onnx, onnxruntime), and by OpenVINO too with
    ``runtimes=("onnxruntime", "openvino")`` (the ``deploy`` extra). Returns the ExportReport."""
    from .export.onnx import export_onnx as _export
    return _export(qmodel, path, example_inputs, **kwargs)


def sensitivity(model: nn.Module, calib_data: Any, held_data: Any, **kwargs) -> dict[str, Any]:
    """Per-layer sensitivity to weight bits and its proxies (``eval.sensitivity``): keyword
    arguments ``recipe`` (base, default w4a8), ``bits``, ``seed``, ``probes``."""
    from .eval.sensitivity import layer_sensitivity
    return layer_sensitivity(model, calib_data, held_data, **kwargs)


def allocate(sens: dict[str, Any], *, avg_bits: float | None = None,
             size_bytes: int | None = None, criterion: str = "kl",
             recipe: Recipe | str | None = None, bits=None) -> Recipe:
    """The mixed-precision recipe: ``recipe`` (default: the measured one) with per-layer weight
    bits minimising the summed ``criterion`` under the budget (``quant.allocate``); its
    ``description`` states the average bits reached."""
    from .quant.allocate import allocate_from_sensitivity, mixed_recipe
    alloc = allocate_from_sensitivity(sens, avg_bits=avg_bits, size_bytes=size_bytes,
                                      criterion=criterion, bits=bits)
    base = resolve_recipe(recipe) if recipe is not None else Recipe.from_dict(sens["recipe"])
    return mixed_recipe(base, alloc)
