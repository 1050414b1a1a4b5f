"""Real natural photos from installed packages, as seeded random crops for an ImageNet CNN.

No ImageNet images exist offline, so an ImageNet model is calibrated and scored on real photos
that Debian and PyPI packages ship: the sample images of Debian ``opencv-doc``
(``/usr/share/doc/opencv-doc/examples/data``) and the ``skimage/data`` images of PyPI
``scikit-image`` (read as files; the package is never imported). Only natural RGB photos are
used -- no charts, logos, text, renders, paintings or grey-scale images.

Calibration crops come from ``CALIB_PHOTOS``, evaluation crops from ``EVAL_PHOTOS``: the two
sets share no photo, and near-duplicate pairs (stereo pairs, the two ELA images, ...) sit on one
side together. A crop is torchvision's ``RandomResizedCrop`` (Inception-style: area 25-100 %,
aspect 3/4-4/3, bicubic) plus a random horizontal flip, drawn under ``torch.random.fork_rng``
with a fixed seed, so crops are reproducible and the caller's RNG is left untouched. Crop ``i``
is taken from photo ``i % len(photos)``, so every photo contributes equally.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch

from slimtorch.errors import DatasetNotFoundError, SlimtorchError

OPENCV_DIR = Path(os.environ.get("SLIMTORCH_OPENCV_DATA",
                                 "/usr/share/doc/opencv-doc/examples/data"))
# (source, file name); "opencv" = Debian opencv-doc, "skimage" = PyPI scikit-image
CALIB_PHOTOS = tuple(("opencv", f) for f in (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "board.jpg",
    "building.jpg", "ela_modified.jpg", "ela_original.jpg", "fruits.jpg", "home.jpg",
    "left.jpg", "right.jpg", "stuff.jpg")) + (("skimage", "astronaut.png"),
                                              ("skimage", "rocket.jpg"))
EVAL_PHOTOS = tuple(("opencv", f) for f in (
    "baboon.jpg", "butterfly.jpg", "chicky_512.png", "graf1.png", "graf3.png", "leuvenA.jpg",
    "leuvenB.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
    "rubberwhale2.png", "squirrel_cls.jpg")) + tuple(("skimage", f) for f in (
        "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png"))
SPLITS = {"calib": CALIB_PHOTOS, "eval": EVAL_PHOTOS}
INSTALL_HINT = ("apt-get install opencv-doc (Debian) and pip install --no-deps scikit-image "
                "(PyPI)")
SCALE, RATIO = (0.25, 1.0), (3 / 4, 4 / 3)


def _source_dir(source: str) -> Path:
    if source == "opencv":
        return OPENCV_DIR
    spec = importlib.util.find_spec("skimage")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"scikit-image is not installed: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "data"


def photo_paths(split: str) -> list[Path]:
    """Paths of the photos of ``split`` ("calib" or "eval"); DatasetNotFoundError if missing."""
    if split not in SPLITS:
        raise SlimtorchError(f"unknown photo split {split!r}: use one of {', '.join(SPLITS)}")
    paths = [_source_dir(src) / name for src, name in SPLITS[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} photo(s) missing, e.g. {missing[0]}: "
                                   f"{INSTALL_HINT}; or point SLIMTORCH_OPENCV_DATA at "
                                   "opencv-doc's examples/data")
    return paths


@lru_cache(maxsize=64)
def load_photo(path: Path):
    """The photo at ``path`` as an RGB PIL image."""
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


def random_crops(split: str, n: int, seed: int, size: int) -> torch.Tensor:
    """``n`` seeded random-resized, randomly flipped ``size`` x ``size`` crops of the photos
    of ``split``: uint8 ``[n, 3, size, size]``, RGB."""
    from torchvision.transforms import v2
    if n < 1:
        raise SlimtorchError(f"number of crops must be >= 1, got {n}")
    photos = [load_photo(p) for p in photo_paths(split)]
    crop = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(
        size, scale=SCALE, ratio=RATIO, interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True), v2.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is restored afterwards
        torch.manual_seed(seed)
        return torch.stack([crop(photos[i % len(photos)]) for i in range(n)])


def normalize(crops: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 RGB crops -> float ``(x - mean) / std`` (EfficientNet-Lite: mean 127, std 128)."""
    return (crops.float() - mean) / std


def center_crop(path: Path, size: int, padding: int = 32) -> torch.Tensor:
    """The evaluation view of one photo, as TF EfficientNet preprocesses it: the central
    ``size / (size + padding)`` of the shorter side, resized (bicubic) to ``size`` x ``size``;
    uint8 ``[3, size, size]``."""
    from torchvision.transforms import v2
    image = v2.functional.pil_to_tensor(load_photo(Path(path)))
    side = round(min(image.shape[-2:]) * size / (size + padding))
    image = v2.functional.center_crop(image, [side, side])
    return v2.functional.resize(image, [size, size],
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
