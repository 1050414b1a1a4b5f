"""Artifact lifecycle: quantize → save → reload gives bit-identical outputs; damage is refused."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtorch
from slimtorch.errors import ArtifactError
from slimtorch.export.artifact import CONFIG, TENSORS, pack_bits, unpack_bits
from slimtorch.export.compact import compact, expand
from slimtorch.quant.quantizer import Quantizer
from slimtorch.eval.size import fp_size_bytes, quantized_size_bytes

from conftest import make_cnn


@pytest.mark.parametrize("bits,qmin", [(2, 0), (3, -4), (4, 0), (6, -32), (8, -128)])
def test_pack_unpack_roundtrip(bits, qmin):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(qmin, qmin + 2 ** bits, (7, 13), generator=g, dtype=torch.int16)
    packed = pack_bits(q, bits, qmin)
    assert packed.numel() == -(-q.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, qmin, [7, 13]), q)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "w2a2"])
def test_save_load_bit_identical(tmp_path, images, recipe):
    model = make_cnn()
    q = slimtorch.quantize(model, recipe, images)
    slimtorch.save(q, tmp_path / "art")
    r = slimtorch.load(tmp_path / "art", model=model)
    assert torch.equal(r(images), q(images))
    for name in ("stem", "conv1", "fc"):
        a, b = getattr(q, name), getattr(r, name)
        assert torch.equal(a.weight_int, b.weight_int)
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale)
        assert torch.equal(a.input_quantizer.zero_point, b.input_quantizer.zero_point)


def test_artifact_contents(tmp_path, images):
    model = make_cnn()
    q = slimtorch.quantize(model, "w4a4", images)
    slimtorch.save(q, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [TENSORS, CONFIG]
    cfg = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert cfg["meta"]["recipe"]["name"] == "w4a4" and cfg["packed"]["conv1"]["bits"] == 4
    assert {"slimtorch", "torch", "python"} <= set(cfg["versions"])
    raw = load_file(tmp_path / "a" / TENSORS)
    assert len(raw) <= 3  # small tensors are concatenated: one entry per dtype
    state = expand(raw, cfg["layout"])
    assert state["conv1.weight_int.packed"].dtype == torch.uint8
    assert state["conv1.weight_int.packed"].numel() == 8 * 8 * 9 * 4 // 8
    assert "conv1.weight" not in state
    # symmetric weights: zero-points stored as shapes only; the shared input quantizer once
    zero_zp = [f"{n}.zero_point" for n, m in q.named_modules()
               if isinstance(m, Quantizer) and not torch.any(m.zero_point)]
    assert zero_zp and set(zero_zp) <= set(cfg["layout"]["zeros"])
    assert quantized_size_bytes(q) < fp_size_bytes(model) / 2


def test_shared_quantizer_saved_once_and_shared_after_load(tmp_path, images):
    model = make_cnn()
    q = slimtorch.quantize(model, "w8a8", images)  # conv1's input = the residual add's x
    slimtorch.save(q, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert "conv1.input_quantizer.scale" in cfg["layout"]["aliases"].values()
    r = slimtorch.load(tmp_path / "a", model=model)
    key = next(iter(r._slimtorch_meta["plan"]["functional"]))
    assert r.slimtorch_functional.site(key)[0] is r.conv1.input_quantizer
    assert torch.equal(r(images), q(images))


def test_compact_layout_round_trip_is_exact():
    torch.manual_seed(0)
    shared = torch.randn(3)
    state = {"big": torch.randn(2000), "neg_zero": torch.tensor([-0.0, 0.0]),
             "zeros": torch.zeros(4, 2), "izeros": torch.zeros(5, dtype=torch.int16),
             "s": torch.tensor(0.5), "shared": shared, "alias": shared,
             "codes": torch.randint(0, 255, (7,), dtype=torch.uint8), "empty": torch.zeros(0)}
    tensors, layout = compact(state)
    assert set(layout["zeros"]) == {"zeros", "izeros"} and layout["aliases"] == {
        "alias": "shared"}
    assert set(tensors) == {"big", "__small__.float32", "__small__.uint8"}
    back = expand(tensors, layout)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8),
                           v.reshape(-1).view(torch.uint8)), k  # bit for bit


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path, images):
    q = slimtorch.quantize(make_cnn(), "w8a8", images)
    slimtorch.save(q, tmp_path / "a")
    slimtorch.save(q, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_tampered_truncated_and_missing(tmp_path, images):
    model = make_cnn()
    q = slimtorch.quantize(model, "w8a8", images)
    d = tmp_path / "a"
    slimtorch.save(q, d)
    data = bytearray((d / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (d / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="truncated or was modified"):
        slimtorch.load(d, model=model)
    (d / TENSORS).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated or was modified"):
        slimtorch.load(d, model=model)
    (d / CONFIG).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        slimtorch.load(d, model=model)
    with pytest.raises(ArtifactError, match="not a slimtorch artifact"):
        slimtorch.load(tmp_path / "nothing", model=model)


def test_custom_model_needs_architecture(tmp_path, images):
    q = slimtorch.quantize(make_cnn(), "w8a8", images)
    slimtorch.save(q, tmp_path / "a")
    with pytest.raises(ArtifactError, match="pass the float architecture"):
        slimtorch.load(tmp_path / "a")


def test_save_refuses_plain_model(tmp_path):
    with pytest.raises(ArtifactError, match="not produced by slimtorch.quantize"):
        slimtorch.save(make_cnn(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_atomic_path_never_leaves_a_half_written_file(tmp_path):
    from slimtorch.export.artifact import atomic_path
    target = tmp_path / "f.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target, 0o644) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o644
    assert sorted(tmp_path.iterdir()) == [target]
