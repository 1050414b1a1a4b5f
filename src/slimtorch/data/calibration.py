"""The calibration-data contract and its checks.

``calib_data`` is an iterable of items, or one Tensor holding a stack of samples (split into
batches of the recipe's ``calib.batch_size``). An item is a Tensor (one positional argument),
a tuple/list (positional arguments) or a dict (keyword arguments, e.g. a tokenizer's output).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..errors import CalibrationDataError


def calibration_batches(calib_data: Any, batch_size: int) -> list[Any]:
    """Materialise calibration items as a list, rejecting empty data and NaN/inf values."""
    if calib_data is None:
        raise CalibrationDataError("no calibration data given; pass a Tensor of samples or "
                                   "an iterable of batches (Tensor, tuple or dict)")
    if isinstance(calib_data, Tensor):
        items = list(calib_data.split(batch_size)) if calib_data.numel() else []
    elif isinstance(calib_data, dict):
        items = [calib_data]
    else:
        try:
            items = list(calib_data)
        except TypeError:
            raise CalibrationDataError(
                f"calibration data of type {type(calib_data).__name__} is not iterable; pass "
                "a Tensor of samples or an iterable of batches") from None
    if not items:
        raise CalibrationDataError("calibration data is empty: give at least one batch")
    for i, item in enumerate(items):
        check_item(item, i)
    return items


def check_item(item: Any, index: int) -> None:
    tensors = [t for t in tree_flatten(item)[0] if isinstance(t, Tensor)]
    if not tensors:
        raise CalibrationDataError(f"calibration batch {index} holds no tensor "
                                   f"(got {type(item).__name__})")
    for j, t in enumerate(tensors):
        if t.numel() == 0:
            raise CalibrationDataError(f"calibration batch {index} has an empty tensor "
                                       f"(input {j}, shape {tuple(t.shape)})")
        if t.is_floating_point():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise CalibrationDataError(
                    f"calibration batch {index} contains {bad} NaN/inf value(s) in input {j} "
                    f"(shape {tuple(t.shape)}); clean or drop that batch")
