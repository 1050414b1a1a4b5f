"""Activation cache for reconstruction: fixed-size row tensors bounded in RAM, spilling to disk.

``CachePool(budget_bytes, spill_dir)`` hands out ``[N, *shape]`` tensors. While the pool's RAM
budget lasts they are ordinary tensors; beyond it they are file-backed (``torch.from_file``,
memory-mapped, shared) in ``spill_dir``, so the OS pages them in and out instead of the
process growing. ``release`` frees a tensor (and deletes its file).
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor


class CachePool:
    def __init__(self, budget_bytes: int, spill_dir: str | Path | None = None):
        self.budget = int(budget_bytes)
        self.used = 0
        self._own_dir = spill_dir is None
        self._dir = Path(spill_dir) if spill_dir is not None else None
        self._files: dict[int, Path] = {}
        self._ram: dict[int, int] = {}
        self._count = 0
        self.spilled_bytes = 0

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="slimtorch-cache-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._count += 1
        if self.used + nbytes <= self.budget:
            t = torch.empty(shape, dtype=dtype)
            self.used += nbytes
            self._ram[id(t)] = nbytes
            return t
        path = self._spill_dir() / f"cache{self._count}.bin"
        t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self._files[id(t)] = path
        self.spilled_bytes += nbytes
        return t

    def release(self, t: Tensor | None) -> None:
        if t is None:
            return
        self.used -= self._ram.pop(id(t), 0)
        path = self._files.pop(id(t), None)
        if path is not None:
            del t
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
