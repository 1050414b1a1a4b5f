"""The optimised-graph census names why a quantized op stays float in onnxruntime, on small
hand-built QDQ graphs (each one shape onnxruntime's QDQ selectors reject), and the runtime
registry refuses unknown or missing runtimes with the fix."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from slimtorch.errors import SlimtorchError  # noqa: E402
from slimtorch.export import runtime  # noqa: E402
from slimtorch.export.onnx_check import kernel_census  # noqa: E402

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _save(tmp_path, nodes, inits, outputs, inputs=(X,)):
    g = helper.make_graph(nodes, "g", list(inputs), [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 8, 6, 6]) for o in outputs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def _conv_unit(i, src, out, requantize=True):
    """DQ(int8 weight) → Conv(src) [→ Q(uint8) → DQ] producing ``out``."""
    w = np.random.default_rng(i).integers(-60, 60, (8, 8, 3, 3)).astype(np.int8)
    conv_out = f"c{i}" if requantize else out
    nodes = [helper.make_node("DequantizeLinear", [f"w{i}", "sw", "zw"], [f"wf{i}"]),
             helper.make_node("Conv", [src, f"wf{i}"], [conv_out], pads=[1, 1, 1, 1],
                              name=f"conv{i}")]
    if requantize:
        nodes += [helper.make_node("QuantizeLinear", [conv_out, "so", "zo"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", "so", "zo"], [out])]
    return nodes, [_init(f"w{i}", w)]


SCALES = [_init("sw", np.float32(0.01)), _init("zw", np.int8(0)), _init("so", np.float32(0.1)),
          _init("zo", np.uint8(128)), _init("sx", np.float32(0.05))]


def _fallbacks(path):
    return {f["node"]: f["reason"] for f in kernel_census(path, 1)["fallbacks"]
            if f["quantized"]}


def test_signed_activation_read_by_two_dq_stays_float(tmp_path):
    """An int8 activation Q with two DQ consumers (a fork) is not made uint8, so neither conv
    gets onnxruntime's u8 kernel on x86; the reason names the fan-out."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xa"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xb"])]
    inits = SCALES + [_init("zx", np.int8(0))]
    for i, src in ((0, "xa"), (1, "xb")):
        n, w = _conv_unit(i, src, f"y{i}")
        nodes, inits = nodes + n, inits + w
    census = kernel_census(_save(tmp_path, nodes, inits, ["y0", "y1"]), 1)
    falls = {f["node"]: f["reason"] for f in census["fallbacks"] if f["quantized"]}
    if census["int8_kernels"].get("QLinearConv", 0) == 2:
        pytest.skip("this onnxruntime runs int8 activations on this CPU")
    assert set(falls) == {"conv0", "conv1"}
    assert all("signed int8 activation" in r and "2 consumers" in r for r in falls.values())


def test_float_operand_and_unrequantized_output_are_named(tmp_path):
    """conv0: output read by Relu only (no Q after it; onnxruntime fuses the Relu, so its
    FusedConv feeds the graph output); add: one operand is a float input."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zo"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zo"], ["xd"])]
    conv, w = _conv_unit(0, "xd", "c", requantize=False)
    nodes += conv + [helper.make_node("Relu", ["c"], ["r"]),
                     helper.make_node("Add", ["xd", "y"], ["s"], name="add"),
                     helper.make_node("QuantizeLinear", ["s", "so", "zo"], ["sq"]),
                     helper.make_node("DequantizeLinear", ["sq", "so", "zo"], ["out"])]
    falls = _fallbacks(_save(tmp_path, nodes, SCALES + w, ["r", "out"], (X, y)))
    assert falls["conv0"].startswith("output not re-quantized (read by ")
    assert "ConvInteger" in falls["conv0"]
    assert falls["add"].startswith("input 1 has no Q/DQ")


def test_runtime_registry_errors(monkeypatch):
    with pytest.raises(SlimtorchError, match="unknown runtime 'tensorrt'.*onnxruntime, openvino"):
        runtime.parse_runtimes("onnxruntime,tensorrt")
    with pytest.raises(SlimtorchError, match="no runtime given"):
        runtime.parse_runtimes(" , ")
    assert runtime.parse_runtimes("onnxruntime", ("openvino", "onnxruntime")) == (
        "onnxruntime", "openvino") or not _has("openvino")
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(runtime.RuntimeMissingError,
                       match=r"'openvino' is not installed: pip install openvino==.*deploy"):
        runtime.get_runtime("openvino")


def _has(pkg: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(pkg) is not None
