"""Fashion-MNIST loader: real splits, seeded calibration subsets, clear errors on bad data."""

import gzip
import shutil

import pytest
import torch

from slimtorch.data import fashion_mnist as fm
from slimtorch.errors import DatasetNotFoundError, SlimtorchError


def write_idx(path, magic: int, array: torch.Tensor, compress: bool = False) -> None:
    """Write a uint8 tensor as an IDX file (optionally gzip-compressed)."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.numpy().tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_tiny_dataset(root, n: int = 5, compress: bool = False) -> None:
    """Four valid IDX files with ``n`` images per split."""
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        images = torch.arange(n * 28 * 28).reshape(n, 28, 28).remainder(256).to(torch.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", 2049,
                  torch.arange(n, dtype=torch.uint8), compress)


@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_splits_shapes_dtypes_labels(split, n):
    images, labels = fm.load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced


def test_test_set_normalized():
    x, y = fm.test_set()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_calibration_set_is_seeded():
    a, b = fm.calibration_set(64, seed=0), fm.calibration_set(64, seed=0)
    assert a.shape == (64, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, fm.calibration_set(64, seed=1))


def test_calibration_images_come_from_train_not_test():
    calib = fm.calibration_set(32, seed=3).flatten(1)  # [32, 784]
    train = fm.to_input(fm.load_fashion_mnist("train")[0]).flatten(1)  # [60000, 784]
    test = fm.test_set()[0].flatten(1)  # [10000, 784]
    # every calibration image is a train image; at most a rare train/test duplicate is in test
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(calib, train, compute_mode=exact).min(dim=1).values.max() == 0
    assert (torch.cdist(calib, test, compute_mode=exact).min(dim=1).values == 0).sum() <= 1


@pytest.mark.parametrize("n", [0, 60_001, 2.5])
def test_calibration_size_validated(n):
    with pytest.raises(SlimtorchError, match="1..60000"):
        fm.calibration_set(n)


def test_missing_root_says_how_to_get_data(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="SLIMTORCH_FMNIST_DIR"):
        fm.load_fashion_mnist("test", root=tmp_path)  # exists, but holds no IDX files


@pytest.mark.parametrize("compress", [False, True])
def test_env_var_root_plain_and_gzip(tmp_path, monkeypatch, compress):
    make_tiny_dataset(tmp_path, n=5, compress=compress)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    images, labels = fm.load_fashion_mnist("test")
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_idx_raises(tmp_path, compress):
    make_tiny_dataset(tmp_path, n=5, compress=compress)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimtorchError, match="corrupt"):
        fm.load_fashion_mnist("train", root=tmp_path)


def test_wrong_magic_raises(tmp_path):
    make_tiny_dataset(tmp_path)
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(SlimtorchError, match="magic 2051"):
        fm.load_fashion_mnist("test", root=tmp_path)


def test_unknown_split():
    with pytest.raises(SlimtorchError, match="'train' or 'test'"):
        fm.load_fashion_mnist("val")
