"""Weight code forms of the ONNX export: the u8 form is exact in onnxruntime on every x86 CPU,
the s8 form saturates on CPUs without VNNI, auto follows the CPU, integer kernels still run."""
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimtorch  # noqa: E402
from slimtorch.eval import machine  # noqa: E402
from slimtorch.export.onnx import OnnxExportError, export_onnx  # noqa: E402
from slimtorch.export.onnx_weight_form import resolve_weight_form  # noqa: E402


class Saturating(nn.Module):
    """Positive weights (codes up to 127) on large positive activations (uint8 codes near 255):
    each pair of u8×s8 products is ≈ 2·255·127 = 64 770, beyond int16."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)
        for m in (self.conv_a, self.conv_b, self.fc):
            nn.init.uniform_(m.weight, 0.5, 1.0)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.relu(self.conv_b(torch.relu(self.conv_a(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def saturating():
    torch.manual_seed(0)
    x = torch.rand(16, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.8
    return slimtorch.quantize(Saturating().eval(), "w8a8", x), x


@pytest.mark.parametrize("conv_integer", [False, True])
def test_u8_form_exact_where_s8_saturates(tmp_path, saturating, conv_integer):
    q, x = saturating
    r = {f: export_onnx(q, tmp_path / f"{f}.onnx", x[:2], check_inputs=[x], weight_form=f,
                        conv_integer=conv_integer) for f in ("s8", "u8")}
    assert r["u8"].weight_form == "u8" and r["u8"].rewrites["u8_weights"] == 3
    assert r["s8"].rewrites["u8_weights"] == 0
    assert r["u8"].agreement["max_rel_diff"] < 1e-5  # int32 sums exact: float rounding only
    # the same integer kernels run in both forms (conv_a re-quantized -> QLinearConv, fc fused
    # with its bias; conv_b, not re-quantized, as ConvInteger when asked)
    kernels = {"QLinearConv": 1, "MatMulIntegerToFloat": 1} | (
        {"ConvInteger": 1} if conv_integer else {})
    assert r["u8"].int8_kernels == r["s8"].int8_kernels == kernels
    if machine.u8s8_saturates():  # this CPU runs VPMADDUBSW: the s8 file is wrong here
        assert r["s8"].agreement["max_rel_diff"] > 0.1
    else:
        assert r["s8"].agreement["max_rel_diff"] < 1e-5


def test_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(machine, "u8s8_saturates", lambda: True)
    form, why = resolve_weight_form("auto")
    assert form == "u8" and "without VNNI" in why
    monkeypatch.setattr(machine, "u8s8_saturates", lambda: False)
    assert resolve_weight_form("auto")[0] == "s8"
    assert resolve_weight_form("u8") == ("u8", "requested")


def test_unknown_weight_form_is_refused(tmp_path, saturating):
    with pytest.raises(OnnxExportError, match="auto, s8, u8"):
        export_onnx(saturating[0], tmp_path / "m.onnx", saturating[1][:2], weight_form="s7")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("flags, arch, saturates", [
    ({"avx2", "fma"}, "x86_64", True),  # AVX2 only (this project's CI box)
    ({"avx2", "avx_vnni"}, "x86_64", False),  # AVX-VNNI
    ({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"}, "x86_64", True),  # Skylake-X
    ({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "amx_int8", "amx_tile"}, "x86_64", False),
    (None, "x86_64", True),  # flags unknown: assume the worst, export the exact form
    (set(), "aarch64", False)])
def test_u8s8_saturation_rule(flags, arch, saturates):
    flags = None if flags is None else frozenset(flags)
    assert machine.saturates_on(flags, arch) is saturates


def test_machine_line_names_the_int8_kernel_class():
    info = machine.machine_info()
    assert info["isa"].startswith(torch.backends.cpu.get_cpu_capability())
    assert info["onnxruntime u8×s8 dot"] == machine.int8_kernel_class()
