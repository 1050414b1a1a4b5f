"""Public entry points: ``quantize``, ``save``, ``load``, ``export_onnx``.

``quantize`` composes small steps: resolve the recipe → check the calibration data → copy and
prepare the model (rewrite, capture, plan, attach quantizers) → calibrate → run the recipe's
method → freeze the integer weights.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .algorithms import ALGORITHMS
from .data.calibration import calibration_batches
from .eval.selfcheck import CheckReport, check, default_floor, enforce
from .export.artifact import load, save
from .quant.prepare import META_ATTR, calibrate, freeze, prepare, sync_shared
from .recipe import Recipe, resolve_recipe

__all__ = ["quantize", "save", "load", "export_onnx", "inspect"]


def quantize(model: nn.Module, recipe: Recipe | str | dict, calib_data: Any, *, seed: int = 0,
             progress: bool = False, work_dir: str | None = None, self_check: bool = True,
             strict: bool = False, min_sqnr_db: float | None = None) -> nn.Module:
    """Return a quantized copy of ``model`` (same forward signature; the input is untouched).

    calib_data: a Tensor of samples, or an iterable of items — a Tensor (one positional
    argument), a tuple (positional arguments) or a dict (keyword arguments).
    work_dir: where reconstruction methods keep per-unit state; a rerun with the same recipe,
    seed and data resumes after the last finished unit.
    self_check: compare quantized and float outputs (and every layer's SQNR) on the first
    calibration batch (``eval.selfcheck``); below ``min_sqnr_db`` (default by bit width: 6 dB
    at 8 bits, 0 dB below) it warns, or with
    ``strict=True`` raises ``QuantizationCheckError``. The report is in the artifact metadata
    (``self_check``) and in ``metrics.json``.
    """
    recipe = resolve_recipe(recipe)
    batches = calibration_batches(calib_data, recipe.calib.batch_size)
    torch.manual_seed(seed)
    qmodel = copy.deepcopy(model).eval()
    meta = prepare(qmodel, recipe, batches[0], seed=seed)
    calibrate(qmodel, batches, progress=progress)
    meta["method_stats"] = ALGORITHMS[recipe.method](
        qmodel, recipe, batches, seed=seed, progress=progress, float_model=model,
        work_dir=work_dir)
    sync_shared(qmodel, meta["plan"])
    freeze(qmodel)
    setattr(qmodel, META_ATTR, meta)
    if self_check:
        floor = default_floor(recipe) if min_sqnr_db is None else min_sqnr_db
        report = check(qmodel, model, batches[0], min_sqnr_db=floor, meta=meta)
        meta["self_check"] = report.to_dict(worst=8)
        enforce(report, strict=strict)
    return qmodel


def inspect(qmodel: nn.Module, float_model: nn.Module, inputs: Any) -> CheckReport:
    """Per-layer SQNR of ``qmodel`` against ``float_model`` on one input item (Tensor, tuple of
    positional arguments or dict of keywords): ``report.table(None)`` prints every layer,
    ``report.worst()`` the layers with the largest own error (``eval.selfcheck``)."""
    return check(qmodel, float_model, inputs)


def export_onnx(qmodel: nn.Module, path, example_inputs: Any, **kwargs):
    """ONNX QDQ export checked by onnxruntime (``export.onnx.export_onnx``; needs the
    ``export`` extra: onnx, onnxruntime). Returns the ExportReport."""
    from .export.onnx import export_onnx as _export
    return _export(qmodel, path, example_inputs, **kwargs)
