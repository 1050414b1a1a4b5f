"""OpenVINO as a second runtime: the export check compares its outputs with PyTorch and reads
from the compiled model which layers run int8; on x86 without VNNI its int8 kernels saturate
like onnxruntime's (the s8 weight form), and the exact u8 form runs those layers in f32."""
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

import slimtorch  # noqa: E402
from slimtorch.eval import machine  # noqa: E402
from slimtorch.export import runtime  # noqa: E402
from slimtorch.export.onnx import export_onnx  # noqa: E402

from conftest import make_cnn  # noqa: E402
from test_onnx_weight_form import Saturating  # noqa: E402

BOTH = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def cnn():
    imgs = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return slimtorch.quantize(make_cnn(), "w8a8", imgs), imgs


@pytest.mark.parametrize("form", ["s8", "u8"])
def test_openvino_check_and_int8_census(tmp_path, cnn, form):
    q, imgs = cnn
    r = export_onnx(q, tmp_path / "c.onnx", imgs[:2], check_inputs=[imgs[:5], imgs[5:]],
                    weight_form=form, runtimes=BOTH)
    ov = r.runtime_checks["openvino"]
    assert "error" not in ov and ov["agreement"]["n"] == 32
    c = ov["census"]
    # stem, conv1, conv2, fc; a uint8 + 128 weight (zero point 128) is not a symmetric int8
    # weight for OpenVINO: that layer runs in f32 on the dequantised weight
    assert c["int8_layers"] + c["float_layers"] == 4
    assert c["int8_layers"] == 4 - r.rewrites.get("u8_weights", 0)
    assert len(c["float"]) == c["float_layers"]
    if form == "u8" or not machine.u8s8_saturates():
        assert ov["agreement"]["top1_agreement"] == 100.0
        assert ov["agreement"]["max_rel_diff"] < 1e-2


def test_openvino_saturates_like_onnxruntime_without_vnni(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.8
    q = slimtorch.quantize(Saturating().eval(), "w8a8", x)
    r = {f: export_onnx(q, tmp_path / f"{f}.onnx", x[:2], check_inputs=[x], weight_form=f,
                        runtimes=BOTH).runtime_checks["openvino"] for f in ("s8", "u8")}
    assert r["s8"]["census"]["int8_layers"] == 3 and r["u8"]["census"]["int8_layers"] == 0
    assert r["u8"]["agreement"]["max_rel_diff"] < 1e-5  # f32 on exact weights
    if machine.u8s8_saturates():
        assert r["s8"]["agreement"]["max_rel_diff"] > 0.1  # VPMADDUBSW, as in onnxruntime
    else:
        assert r["s8"]["agreement"]["max_rel_diff"] < 1e-5


def test_missing_runtime_names_the_install(tmp_path, cnn, monkeypatch):
    q, imgs = cnn
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name: None if name == "openvino" else real(name))
    with pytest.raises(runtime.RuntimeMissingError, match="pip install openvino=="):
        export_onnx(q, tmp_path / "c.onnx", imgs[:2], runtimes="openvino")
    assert not (tmp_path / "c.onnx").exists()
