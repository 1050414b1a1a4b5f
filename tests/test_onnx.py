"""ONNX QDQ export: onnxruntime agrees with the PyTorch quantized model, every quantized op sits
between Q/DQ nodes, integer kernels run, and a failing export leaves an existing file alone."""
import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimtorch  # noqa: E402
from slimtorch.export import onnx_check  # noqa: E402
from slimtorch.export.onnx import OnnxExportError, export_onnx  # noqa: E402
from slimtorch.zoo.models import TinyViT  # noqa: E402

from conftest import make_cnn  # noqa: E402

COMPUTE = ("Conv", "MatMul", "Gemm")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT(image_size=12, patch=4, dim=32, depth=1, heads=2).eval()


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def export(model, recipe, imgs, path, **kw):
    q = slimtorch.quantize(model, recipe, imgs)
    report = export_onnx(q, path, imgs[:2], check_inputs=[imgs[:5], imgs[5:]], **kw)
    return q, report, onnx.load(str(path))


def producers(graph):
    return {o: n for n in graph.node for o in n.output}


def integer_initializers(graph):
    return {t.name for t in graph.initializer if t.data_type in (
        onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4)}


def dq_of_activation(prod, dq) -> bool:
    src = prod.get(dq.input[0])
    return src is not None and src.op_type == "QuantizeLinear"


def assert_qdq_around_compute(graph):
    """Every Conv/MatMul/Gemm reads DQ outputs only, and weights are integer initializers;
    a Linear fused with its bias (MatMulIntegerToFloat) reads the Q output and integer codes."""
    prod, ints = producers(graph), integer_initializers(graph)
    count = 0
    for n in graph.node:
        if n.op_type == "MatMulIntegerToFloat":
            assert prod[n.input[0]].op_type == "QuantizeLinear" and n.input[1] in ints
            assert len(n.input) == 7  # ..., bias
            count += 1
        if n.op_type not in COMPUTE:
            continue
        for name in n.input[:2]:
            dq = prod.get(name)
            assert dq is not None and dq.op_type == "DequantizeLinear", (n.name, name)
            src = prod.get(dq.input[0])
            assert dq.input[0] in ints or (src is not None and src.op_type == "QuantizeLinear")
        count += 1
    return count


def test_cnn_w8a8_agrees_and_runs_int8(tmp_path, imgs):
    q, r, model = export(make_cnn(), "w8a8", imgs, tmp_path / "cnn.onnx")
    assert r.ort_error is None
    assert r.agreement["n"] == 64 and r.agreement["top1_agreement"] == 100.0
    assert r.agreement["max_rel_diff"] < 1e-2  # ≤ a few 8-bit steps after requantised convs
    assert assert_qdq_around_compute(model.graph) == 4  # stem, conv1, conv2, fc
    # one quantizer per tensor: stem input, conv1 input = the add's skip operand, conv2 input,
    # the add's conv2 operand, fc input
    assert r.weight_dq == 4 and r.activation_qdq == 5
    # every conv's output is re-quantized (by its reader or the residual add's operand
    # quantizer), so all three run as QLinearConv and no conv falls back to float
    assert r.int8_kernels.get("QLinearConv", 0) == 3
    assert r.int8_kernels.get("MatMulIntegerToFloat", 0) == 1  # fc (a Gemm in the trace)
    # the residual add has both operands quantized, but its sum goes to ReLU → pooling → fc's
    # own quantizer, not to a QuantizeLinear: onnxruntime has no QLinearAdd for it
    assert [(f["op"], f["reason"].split(" (")[0]) for f in r.quantized_fallbacks] == [
        ("Add", "output not re-quantized")]
    assert r.float_quantized == {"Add": 1} and r.to_dict()["float_quantized"] == {"Add": 1}


@pytest.mark.parametrize("form", ["s8", "u8"])
def test_weights_are_the_artifact_integers(tmp_path, imgs, form):
    """The file holds the artifact's codes: as int8, or (u8 form) as uint8 codes + 128 with
    zero point 128 — the same dequantised values."""
    q, r, model = export(make_cnn(), "w8a8", imgs, tmp_path / "cnn.onnx", weight_form=form)
    assert r.weight_form == form
    dtype, offset = (np.int8, 0) if form == "s8" else (np.uint8, 128)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    codes = [a.astype(np.int16) - offset for a in arrays.values()
             if a.dtype == dtype and a.ndim == 4]
    mine = sorted(tuple(c.shape) for c in codes)
    stem = tuple(q.stem.weight_int.shape)
    padded = (stem[0], 4, *stem[2:])  # 1 input channel padded to 4 (pad_conv_channels)
    assert mine == sorted([padded] + [tuple(m.weight_int.shape) for m in (q.conv1, q.conv2)])
    assert any(np.array_equal(c, q.conv1.weight_int.numpy()) for c in codes)
    stem_codes = next(c for c in codes if c.shape == padded)
    assert np.array_equal(stem_codes[:, :1], q.stem.weight_int.numpy())
    assert not stem_codes[:, 1:].any()
    zps = [a for a in arrays.values() if a.dtype == dtype and a.ndim == 1 and a.size == 8]
    assert zps and all((z.astype(np.int16) == offset).all() for z in zps)  # per channel


def test_attention_model_w8a8(tmp_path, imgs):
    q, r, model = export(tiny_vit(), "w8a8", imgs, tmp_path / "vit.onnx")
    assert r.ort_error is None and r.agreement["top1_agreement"] == 100.0
    assert r.agreement["max_rel_diff"] < 1e-4
    prod = producers(model.graph)
    act_act = [n for n in model.graph.node if n.op_type == "MatMul" and all(
        prod[i].op_type == "DequantizeLinear" and dq_of_activation(prod, prod[i])
        for i in n.input)]
    assert len(act_act) == 2  # q·kᵀ and probs·v, both operands quantized
    assert_qdq_around_compute(model.graph)
    n_int = r.int8_kernels.get("MatMulIntegerToFloat", 0) + r.int8_kernels.get(
        "QLinearMatMul", 0)
    assert n_int == 7  # qkv, proj, mlp.0, mlp.2, head + the two attention matmuls
    assert r.float_compute == {"Conv": 1}  # the patch embedding: its output is not re-quantized


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4"])
def test_low_bit_exact_and_int4_packed(tmp_path, imgs, recipe):
    q, r, model = export(make_cnn(), recipe, imgs, tmp_path / "c.onnx", int4=True)
    assert r.int4_weights == 2  # conv1, conv2 (first/last layer stay 8-bit)
    int4 = [t for t in model.graph.initializer if t.data_type in (
        onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and len(t.dims) == 4]
    assert len(int4) == 2 and all(len(t.raw_data) == 8 * 8 * 9 // 2 for t in int4)
    for t in int4:  # the packed codes are the artifact's codes
        layer = q.conv1 if "conv1" in t.name else q.conv2
        assert np.array_equal(onnx.numpy_helper.to_array(t).astype(np.int16),
                              layer.weight_int.numpy())
    assert r.agreement["top1_agreement"] == 100.0 and r.agreement["max_rel_diff"] < 1e-2
    if recipe == "w4a4":  # 4-bit activation grids are clipped in float before an 8-bit Q
        assert any(n.op_type == "Clip" for n in model.graph.node)


@pytest.mark.parametrize("recipe", ["w4a8", "w2a4"])
def test_low_bit_asymmetric_weights_centred_in_int8(tmp_path, imgs, recipe):
    """By default asymmetric low-bit codes q (uint8, per-channel zero points z) are stored as
    int8 q − z with zero point 0: the same values, symmetric weights the int8 kernels take."""
    q, r, model = export(make_cnn(), recipe, imgs, tmp_path / "c.onnx")
    assert r.int4_weights == 0 and r.rewrites["centred_weights"] >= 2
    arrays = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    for layer in (q.conv1, q.conv2):
        z = layer.weight_quantizer.zero_point.round().to(torch.int16)
        want = (layer.weight_int - z.reshape(-1, 1, 1, 1)).numpy()
        assert z.any() and any(a.dtype == np.int8 and a.shape == want.shape
                               and np.array_equal(a, want) for a in arrays)
    assert r.agreement["top1_agreement"] == 100.0 and r.agreement["max_rel_diff"] < 1e-2
    if recipe == "w4a8":  # 4-bit activations: a float Clip before each Q blocks the kernels
        assert r.int8_kernels.get("QLinearConv", 0) >= 1


def test_opset17_has_no_int4_and_dynamic_batch(tmp_path, imgs):
    q, r, model = export(make_cnn(), "w4a8", imgs, tmp_path / "c.onnx", opset=17)
    assert r.int4_weights == 0 and model.opset_import[0].version == 17
    assert r.agreement["n"] == 64  # exported at batch 2, checked at batch 5 and 59


def test_failing_export_keeps_existing_file(tmp_path, imgs):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")
    with pytest.raises(OnnxExportError, match="boom"):
        export_onnx(Broken(), path, imgs[:2])
    with pytest.raises(OnnxExportError, match="Tensor"):
        export_onnx(make_cnn(), path, "not a tensor")
    assert path.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_onnxruntime_failure_is_reported(tmp_path, imgs, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("no kernel for this op")
    monkeypatch.setattr(onnx_check, "make_session", refuse)
    q = slimtorch.quantize(make_cnn(), "w8a8", imgs)
    r = export_onnx(q, tmp_path / "m.onnx", imgs[:2])
    assert "no kernel for this op" in r.ort_error and (tmp_path / "m.onnx").is_file()


def test_export_leaves_model_unchanged(tmp_path, imgs):
    q = slimtorch.quantize(tiny_vit(), "w8a8", imgs)
    before = q(imgs)
    export_onnx(q, tmp_path / "v.onnx", imgs[:2])
    assert torch.equal(q(imgs), before)
    assert not any("forward" in m.__dict__ or "quantized_weight" in m.__dict__
                   for m in q.modules())


def test_compare_embedding_metrics():
    ref = np.random.default_rng(0).normal(size=(6, 4, 8)).astype(np.float32)
    mask = np.ones((6, 4), dtype=np.int64)
    mask[:, 3] = 0
    got = ref.copy()
    got[:, 3] += 5.0  # differences only on padding tokens
    out = onnx_check.compare(ref, got, mask)
    assert out["cosine_min"] > 0.999999 and out["retrieval_agreement"] == 100.0
    assert out["max_abs_diff"] == pytest.approx(5.0)


def _deploy_cli(argv):
    """Run ``slimtorch`` with the deploy commands registered (as cli.py will wire them)."""
    import argparse

    from slimtorch import cli, cli_deploy
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "export" not in sub.choices:
        cli_deploy.register(sub)
    args = parser.parse_args(argv)
    args.fn(args)


def test_cli_export_and_bench_speed(tmp_path, capsys):
    import json

    from slimtorch.data.fashion_mnist import calibration_set
    from slimtorch.errors import SlimtorchError
    from slimtorch.zoo.registry import weights_path
    from slimtorch.zoo.sources import load_model
    if not weights_path("resnet20").is_file():
        pytest.skip("zoo weights not trained")
    try:
        calib = calibration_set(64, 0)
    except SlimtorchError:
        pytest.skip("Fashion-MNIST not installed")
    q = slimtorch.quantize(load_model("zoo:resnet20"), "w8a8", calib)
    slimtorch.save(q, tmp_path / "art", extra={"task": "classification"})
    import importlib.util
    runtimes = "onnxruntime,openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    _deploy_cli(["export", str(tmp_path / "art"), "--onnx", str(tmp_path / "r20.onnx"),
                 "--check-samples", "600", "--runtime", runtimes])
    rep = json.loads((tmp_path / "art" / "export_report.json").read_text())
    assert rep["agreement"]["n"] == 600 and rep["agreement"]["top1_agreement"] >= 99.0
    assert rep["float_quantized"] == {"Add": 1}  # the last residual add (test_onnx_zoo_census)
    if "openvino" in runtimes:  # u8 weights (auto on this CPU) or s8: agreement either way
        ov = rep["runtime_checks"]["openvino"]
        assert ov["agreement"]["n"] == 600 and ov["agreement"]["top1_agreement"] >= 99.0
        assert ov["census"]["int8_layers"] + ov["census"]["float_layers"] == 22
    assert rep["int8_kernels"]["QLinearConv"] >= 9 and rep["source"] == "zoo:resnet20"
    from slimtorch.eval.machine import u8s8_saturates
    assert rep["weight_form"] == ("u8" if u8s8_saturates() else "s8")  # --weight-form auto
    assert "top-1 agreement" in capsys.readouterr().out
    _deploy_cli(["bench", "speed", str(tmp_path / "art"), "--batches", "1", "--repeats", "2",
                 "--weight-form", "u8", "--runtime", runtimes])
    out = capsys.readouterr().out
    assert "int8 weight codes u8" in out
    for engine in ("fp32 PyTorch", "fp32 onnxruntime", "int8 onnxruntime", "int8 PyTorch"):
        assert engine in out
    if "openvino" in runtimes:
        assert "int8 vs fp32 openvino" in out and "openvino layers int8 / float" in out
    assert "smaller" in out


class Fork(nn.Module):
    """Two layers read the same tensor (as q/k/v projections do), plus an embedding lookup."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        x = self.emb(ids)  # [B, T, 16]
        return self.head(torch.relu(self.a(x)) * self.b(x)).mean(1)


def test_overhead_passes_are_exact(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (32, 7), generator=torch.Generator().manual_seed(5))
    q = slimtorch.quantize(Fork().eval(), "w8a8", ids)
    assert q.a.input_quantizer is q.b.input_quantizer  # one tensor, one quantizer
    r = export_onnx(q, tmp_path / "f.onnx", ids[:2], check_inputs=[ids])
    assert r.rewrites["merged_quantize"] == 1 and r.rewrites["gather_dequantize"] == 1
    assert r.agreement["max_rel_diff"] < 1e-6
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    assert r.activation_qdq == 2  # a/b input, head input
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == r.activation_qdq
    prod = producers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] not in prod]
    table = [t for t in graph.initializer if t.name == gathers[0].input[0]][0]
    assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [50, 16]


def test_attention_scale_folded_into_dq(tmp_path, imgs):
    q, r, model = export(tiny_vit(), "w8a8", imgs, tmp_path / "vit.onnx")
    assert r.rewrites["folded_matmul_scales"] == 1
    prod = producers(model.graph)
    assert not any(n.op_type == "Mul" and any(
        prod.get(i) is not None and prod[i].op_type == "MatMul" for i in n.input)
        for n in model.graph.node)


@pytest.mark.parametrize("recipe", ["vit-w8a8-repq", "vit-w8a8-ptq4vit"])
def test_non_uniform_quantizers_export_as_float_and_agree(tmp_path, imgs, recipe):
    """log√2 / twin-uniform grids have no QuantizeLinear form: they keep their float arithmetic
    (so onnxruntime computes what PyTorch computes), are reported, and are not lowered to int8."""
    from slimtorch.intops import int8_eligible
    from slimtorch.quant.prepare import activation_quantizers, quant_layers
    q, r, _ = export(tiny_vit(), recipe, imgs, tmp_path / "v.onnx")
    odd = [m for m in activation_quantizers(q) if m.spec.kind != "uniform"]
    assert odd and len(r.float_quantizers) == len(odd)
    assert r.ort_error is None and r.agreement["top1_agreement"] == 100.0
    assert r.agreement["max_rel_diff"] < 0.02  # exported as uniform QDQ it was ~1.0
    for _, layer in quant_layers(q):
        if layer.input_quantizer is not None and layer.input_quantizer.spec.kind != "uniform":
            assert "not uniform" in (int8_eligible(layer) or "not uniform")


def test_op_profile_reads_onnxruntime_kernel_times(tmp_path, imgs):
    q, r, _ = export(make_cnn(), "w8a8", imgs, tmp_path / "p.onnx")
    name = onnx.load(str(tmp_path / "p.onnx")).graph.input[0].name
    prof = onnx_check.op_profile(tmp_path / "p.onnx", {name: imgs[:4].numpy()}, runs=3,
                                 warmup=1)
    assert prof["total_ms"] > 0 and prof["nodes"]
    assert abs(sum(prof["ops"].values()) - prof["total_ms"]) < 1e-6
    assert "QLinearConv" in prof["ops"]  # the int8 kernels that actually ran


def test_conv_channels_padded_for_int8_kernel_exactly(tmp_path, imgs, monkeypatch):
    """A 1-channel stem gets 3 zero input channels (Pad before its Q, zero weight columns):
    onnxruntime's output is the unpadded graph's."""
    from slimtorch.export import onnx_speed
    q = slimtorch.quantize(make_cnn(), "w8a8", imgs)
    r = export_onnx(q, tmp_path / "pad.onnx", imgs[:2], check_inputs=[imgs])
    assert r.rewrites["padded_conv_channels"] == 1 and r.agreement["top1_agreement"] == 100.0
    graph = onnx.load(str(tmp_path / "pad.onnx")).graph
    pad = next(n for n in graph.node if n.op_type == "Pad")
    assert pad.input[0] == graph.input[0].name
    assert [n.op_type for n in graph.node if pad.output[0] in n.input] == ["QuantizeLinear"]
    monkeypatch.setattr(onnx_speed, "pad_conv_channels", lambda gr: 0)
    export_onnx(q, tmp_path / "nopad.onnx", imgs[:2])
    x = {graph.input[0].name: imgs.numpy()}
    a = onnx_check.make_session(tmp_path / "pad.onnx", 1).run(None, x)[0]
    b = onnx_check.make_session(tmp_path / "nopad.onnx", 1).run(None, x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_linear_bias_fused_unless_portable(tmp_path, imgs):
    """Default: each Linear with its bias is one MatMulIntegerToFloat (contrib op) whose output
    equals the portable QDQ file's in onnxruntime; portable: standard ONNX domains only."""
    q = slimtorch.quantize(tiny_vit(), "w8a8", imgs)
    r = export_onnx(q, tmp_path / "f.onnx", imgs[:2], check_inputs=[imgs])
    rp = export_onnx(q, tmp_path / "p.onnx", imgs[:2], check_inputs=[imgs], portable=True)
    assert r.rewrites["fused_matmul_bias"] == 5  # qkv, proj, mlp.0, mlp.2, head
    assert rp.rewrites["fused_matmul_bias"] == 0
    fused, port = (onnx.load(str(tmp_path / f)) for f in ("f.onnx", "p.onnx"))
    assert {o.domain for o in port.opset_import} <= {"", "ai.onnx"}
    mitf = [n for n in fused.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mitf) == 5 and all(n.domain == "com.microsoft" for n in mitf)
    assert_qdq_around_compute(fused.graph)
    x = {fused.graph.input[0].name: imgs.numpy()}
    a = onnx_check.make_session(tmp_path / "f.onnx", 1).run(None, x)[0]
    b = onnx_check.make_session(tmp_path / "p.onnx", 1).run(None, x)[0]
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    assert r.int8_kernels == rp.int8_kernels and r.agreement["top1_agreement"] == 100.0


def test_speed_engines_take_turns():
    """Each engine is timed in every round, rounds interleaved: a burst of load cannot land
    on all runs of one engine."""
    from slimtorch.cli_deploy import interleaved_ms
    calls = []
    runners = {k: (lambda k=k: calls.append(k)) for k in ("a", "b")}
    out = interleaved_ms(runners, rounds=3, repeats=3)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    switches = sum(x != y for x, y in zip(calls, calls[1:]))
    assert switches == 5  # a…a b…b a…a b…b a…a b…b
