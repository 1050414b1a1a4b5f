"""Sub-8-bit asymmetric weights export centred (q − z, zero point 0) in int8: the same float
values, and onnxruntime runs every such conv as QLinearConv (a per-channel weight zero point
made it refuse all but one conv of ResNet-20 before)."""
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimtorch  # noqa: E402
from slimtorch.export.onnx import export_onnx  # noqa: E402
from slimtorch.recipe import load_builtin, load_recipe_text  # noqa: E402

# the reconstruction recipes' scheme (asymmetric per-channel 4-bit weights) with adds quantized
W4A8_ADDS = load_builtin("w4a8").to_dict() | {"name": "w4a8-adds", "quantize_adds": True}


@pytest.mark.slow
def test_asymmetric_4bit_weights_run_as_integer_convs(calib, tmp_path):
    from slimtorch.zoo.registry import weights_path
    from slimtorch.zoo.sources import load_model
    if not weights_path("resnet20").is_file():
        pytest.skip("zoo weights of resnet20 not trained")
    threads = torch.get_num_threads()
    try:
        import yaml
        recipe = load_recipe_text(yaml.safe_dump(W4A8_ADDS))
        q = slimtorch.quantize(load_model("zoo:resnet20"), recipe, calib)
        r = export_onnx(q, tmp_path / "m.onnx", calib[:2], check_inputs=[calib], threads=1)
    finally:
        torch.set_num_threads(threads)
    assert r.ort_error is None
    assert r.int8_kernels.get("QLinearConv") == 21
    assert not [f for f in r.quantized_fallbacks if "Conv" in f["op"]]
    assert r.agreement["top1_agreement"] >= 99.5


@pytest.mark.slow
def test_w4a4_runs_int8_in_openvino_and_float_in_onnxruntime(calib, tmp_path):
    """W4A4 (the QDrop/PD-Quant scheme; RTN here, the export is the same): OpenVINO fuses the
    4-bit activation Clip and runs the centred convs int8; onnxruntime's selectors need
    Conv → QuantizeLinear, so its convs stay float (the reason is listed)."""
    pytest.importorskip("openvino")
    from slimtorch.zoo.registry import weights_path
    from slimtorch.zoo.sources import load_model
    if not weights_path("resnet20").is_file():
        pytest.skip("zoo weights of resnet20 not trained")
    threads = torch.get_num_threads()
    try:
        q = slimtorch.quantize(load_model("zoo:resnet20"), "w4a4", calib)
        r = export_onnx(q, tmp_path / "m.onnx", calib[:2], check_inputs=[calib], threads=1,
                        runtimes=("onnxruntime", "openvino"))
    finally:
        torch.set_num_threads(threads)
    ov = r.runtime_checks["openvino"]
    assert r.rewrites["centred_weights"] == 20  # every 4-bit conv (first/last layer 8-bit)
    assert ov["census"]["int8_layers"] >= 20 and ov["agreement"]["top1_agreement"] >= 99.5
    assert r.int8_kernels.get("QLinearConv", 0) == 0 and r.quantized_fallbacks
