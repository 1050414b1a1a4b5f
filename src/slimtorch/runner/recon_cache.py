"""What reconstruction caches and persists: unit inputs/outputs over the calibration set (in a
bounded ``CachePool`` that spills to disk) and the per-unit state files that let a run resume.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..data.cache import CachePool
from ..data.calibration import item_samples
from ..errors import SlimtorchError
from ..export.artifact import atomic_path, write_json_atomic
from ..graph.capture import call_model


class _Stop(Exception):
    pass


class VariableShapeError(SlimtorchError):
    """A unit's inputs differ in shape between calibration items, so they cannot be cached."""


def cat_items(batches: list) -> Any:
    """All calibration items concatenated along dim 0 (same structure as one item)."""
    return tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0],
                    batches[0], *batches[1:])


def n_samples(batches: list) -> int:
    return sum(item_samples(b) for b in batches)


def run_items(model: nn.Module, batches: list):
    """Run the model on each calibration item in turn (a hook may end a forward early by
    raising ``_Stop``); yields after each item so the caller can read what its hooks saw."""
    for item in batches:
        try:
            call_model(model, item)
        except _Stop:
            pass
        yield item


@torch.no_grad()
def collect(model: nn.Module, module: nn.Module, batches: list, pool: CachePool,
            want_output: bool, pack: Callable[[tuple, dict], Tensor] | None = None
            ) -> tuple[Tensor, Tensor | None]:
    """Cache ``module``'s input (and output) for every calibration sample; stops each forward
    as soon as it has what it needs. ``pack(args, kwargs)`` (``units.pack_args``): what to
    cache as the input when the module takes per-sample arguments besides it."""
    got: dict[str, Tensor] = {}

    def pre(m, args, kwargs):
        got["x"] = args[0] if pack is None else pack(args, kwargs)
        if not want_output:
            raise _Stop

    def post(m, args, out):
        got["y"] = out
        raise _Stop

    hooks = [module.register_forward_pre_hook(pre, with_kwargs=True),
             module.register_forward_hook(post)]
    n, row, xs, ys = n_samples(batches), 0, None, None
    try:
        for _ in run_items(model, batches):
            x = got["x"]
            if xs is None:
                xs = pool.empty((n, *x.shape[1:]), x.dtype)  # indices stay integers
                ys = (pool.empty((n, *got["y"].shape[1:]), got["y"].dtype) if want_output
                      else None)
            if x.shape[1:] != xs.shape[1:]:
                pool.release(xs)
                raise VariableShapeError(
                    f"{type(module).__name__} gets inputs of shape {list(x.shape[1:])} and "
                    f"{list(xs.shape[1:])} from different calibration batches (padded sequences "
                    "of different lengths?), so they cannot be cached as one tensor: pad every "
                    "calibration item to one length (a tokenizer's padding='max_length'), or "
                    "put all of them in one batch (recipe calib.batch_size)")
            xs[row:row + len(x)] = x
            if want_output:
                ys[row:row + len(x)] = got["y"]
            row += len(x)
    finally:
        for h in hooks:
            h.remove()
    return xs, ys


@torch.no_grad()
def unit_map(fn: Callable[[Tensor], Tensor], xs: Tensor, pool: CachePool, chunk: int = 256
             ) -> Tensor:
    first = fn(xs[:chunk])
    out = pool.empty((len(xs), *first.shape[1:]), first.dtype)
    out[:len(first)] = first
    for i in range(chunk, len(xs), chunk):
        out[i:i + chunk] = fn(xs[i:i + chunk])
    return out


# ============================================================== run state (resume)
class WorkDir:
    """Per-unit state files: ``<stage>-<k>.safetensors`` (V and step sizes of the unit)."""

    def __init__(self, path: str | Path | None, fingerprint: str):
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fp_file = self.path / "fingerprint.json"
        if fp_file.is_file() and json.loads(fp_file.read_text()) != fingerprint:
            if any(self.path.glob("*.safetensors")):
                raise SlimtorchError(
                    f"{self.path} holds unit state of a different run (recipe, seed, data or "
                    "model differ); delete it or use another work_dir")
        write_json_atomic(fp_file, fingerprint)

    def _file(self, stage: str, k: int) -> Path | None:
        return None if self.path is None else self.path / f"{stage}-{k}.safetensors"

    def load(self, stage: str, k: int) -> tuple[dict[str, Tensor], dict] | None:
        f = self._file(stage, k)
        if f is None or not f.is_file():
            return None
        return load_file(f), json.loads((f.with_suffix(".json")).read_text())

    def save(self, stage: str, k: int, tensors: dict[str, Tensor], stats: dict) -> None:
        f = self._file(stage, k)
        if f is not None:  # the .safetensors file marks the unit done: written last, atomically
            write_json_atomic(f.with_suffix(".json"), stats)
            with atomic_path(f) as tmp:
                save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)


def fingerprint(recipe_dict: dict, seed: int, batches: list, model: nn.Module) -> str:
    """Hash of what determines the result: recipe, seed, data, calibrated model state."""
    h = hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode())
    h.update(str(seed).encode())
    for t in tree_flatten(batches)[0] + list(model.state_dict().values()):
        if isinstance(t, Tensor):
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
