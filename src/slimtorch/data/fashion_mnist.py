"""Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747) read from its IDX files.

The Debian package ``dataset-fashion-mnist`` installs the four IDX files under
``/usr/share/datasets/fashion-mnist/``. ``root=`` or the ``SLIMTORCH_FMNIST_DIR`` environment
variable point the loader elsewhere. Files may be gzip-compressed (``.gz``) or plain.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import torch

from slimtorch.errors import DatasetNotFoundError, SlimtorchError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SLIMTORCH_FMNIST_DIR"
MEAN, STD = 0.2860, 0.3530  # train-split pixel statistics, on [0, 1]
NUM_TRAIN, NUM_TEST = 60_000, 10_000
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # IDX: uint8 data, 3 dims / 1 dim
_HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian), or pass a directory "
    "holding the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) via --data-dir, "
    f"root=, or the {ENV_VAR} environment variable."
)


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data directory: explicit ``root``, else $SLIMTORCH_FMNIST_DIR, else DEFAULT_ROOT."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}. {_HOW_TO_GET}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip raises these on truncation/corruption
        raise SlimtorchError(f"Cannot read {path}: {exc}. The file is corrupt; reinstall it.") from exc


def _parse_idx(data: bytes, magic: int, dims: int, path: Path) -> torch.Tensor:
    """Parse an IDX uint8 array: 4-byte magic, ``dims`` 4-byte big-endian sizes, payload."""
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise SlimtorchError(f"{path} is not an IDX file with magic {magic}; it is corrupt.")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise SlimtorchError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"file has {len(data)} bytes."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


@functools.lru_cache(maxsize=8)
def _load_cached(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not root.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST directory {root} does not exist. {_HOW_TO_GET}")
    prefix = _PREFIX[split]
    img_path = _find_file(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _parse_idx(_read_bytes(img_path), _IMAGE_MAGIC, 3, img_path)  # [N, 28, 28]
    labels = _parse_idx(_read_bytes(lbl_path), _LABEL_MAGIC, 1, lbl_path).long()  # [N]
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise SlimtorchError(
            f"Fashion-MNIST {split} files in {root} disagree: images {tuple(images.shape)}, "
            f"labels {tuple(labels.shape)}."
        )
    if int(labels.max()) > 9:
        raise SlimtorchError(f"{lbl_path} holds labels outside 0..9; it is corrupt.")
    return images, labels


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 28, 28] and labels as int64 [N] for ``split`` in {'train', 'test'}.

    Results are cached in memory per (root, split); treat the returned tensors as read-only.
    """
    if split not in _PREFIX:
        raise SlimtorchError(f"split must be 'train' or 'test', got {split!r}.")
    return _load_cached(resolve_root(root).resolve(), split)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalized float32 [N, 1, 28, 28]."""
    x = images.to(torch.float32).div(255.0).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
    return (x - MEAN) / STD


def calibration_set(n: int = 1024, seed: int = 0, root: str | os.PathLike | None = None
                    ) -> torch.Tensor:
    """A seeded random subset of ``n`` TRAIN images, normalized float32 [n, 1, 28, 28]."""
    if not isinstance(n, int) or not 1 <= n <= NUM_TRAIN:
        raise SlimtorchError(f"calibration size n must be an int in 1..{NUM_TRAIN}, got {n!r}.")
    images, _ = load_fashion_mnist("train", root)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:n]
    return to_input(images[idx])


def train_set(n: int | None = None, seed: int = 0, root: str | os.PathLike | None = None
              ) -> torch.Tensor:
    """TRAIN images for methods that train (SR-STE recovery): all 60k in file order when
    ``n`` is None, else a seeded random subset of ``n``; normalized float32 [n, 1, 28, 28]."""
    if n is None:
        return to_input(load_fashion_mnist("train", root)[0])
    return calibration_set(n, seed, root)


def test_set(root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full test split: normalized float32 x [10000, 1, 28, 28] and int64 labels [10000]."""
    images, labels = load_fashion_mnist("test", root)
    return to_input(images), labels


test_set.__test__ = False  # not a pytest test, despite the name
