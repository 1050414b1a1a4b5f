"""The calibration-data contract and its checks.

``calib_data`` is any iterable of items (a list, a generator, a torch ``DataLoader``), or one
Tensor holding a stack of samples (split into batches of the recipe's ``calib.batch_size``).
An item is a Tensor (one positional argument), a tuple/list (positional arguments) or a dict
(keyword arguments, e.g. a tokenizer's output); an optional ``transform`` maps each item to that
form first (NNCF's ``Dataset(data_source, transform_func)``). The iterable is read once, item by
item, each checked as it arrives, and with ``max_samples`` only until that many samples are in
(the rest is never pulled: a DataLoader over a whole dataset, even an endless generator, is
fine); methods revisit the calibration set many times, so the (transformed) items are kept.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import CalibrationDataError


def calibration_batches(calib_data: Any, batch_size: int,
                        transform: Callable[[Any], Any] | None = None,
                        max_samples: int | None = None) -> list[Any]:
    """Calibration items as a list, rejecting empty data and NaN/inf values; reading stops
    once ``max_samples`` samples (dim 0 of each item's first tensor) are in."""
    if max_samples is not None and max_samples < 1:
        raise CalibrationDataError(f"max_samples must be >= 1, got {max_samples}")
    if calib_data is None:
        raise CalibrationDataError("no calibration data given; pass a Tensor of samples or "
                                   "an iterable of batches (Tensor, tuple or dict)")
    if isinstance(calib_data, Tensor):
        items = list(calib_data.split(batch_size)) if calib_data.numel() else []
    elif isinstance(calib_data, dict):
        items = [calib_data]
    else:
        try:
            items = iter(calib_data)
        except TypeError:
            raise CalibrationDataError(
                f"calibration data of type {type(calib_data).__name__} is not iterable; pass "
                "a Tensor of samples or an iterable of batches") from None
    out, n = [], 0
    for i, item in enumerate(items):
        item = item if transform is None else transform(item)
        check_item(item, i)
        out.append(item)
        n += item_samples(item)
        if max_samples is not None and n >= max_samples:
            break
    if not out:
        raise CalibrationDataError("calibration data is empty: give at least one batch")
    return out


def item_samples(item: Any) -> int:
    """Samples in one calibration item: dim 0 of its first tensor."""
    t = next(t for t in tree_flatten(item)[0] if isinstance(t, Tensor))
    return t.shape[0] if t.dim() else 1


def take(item: Any, idx: Tensor) -> Any:
    """The samples ``idx`` (dim 0) of every tensor of a calibration item."""
    return tree_map(lambda x: x[idx] if isinstance(x, Tensor) else x, item)


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
