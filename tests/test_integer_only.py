"""Integer-only transformers (I-ViT): the kernels' formulas by hand, their accuracy against the
float functions, the departures from the public code, and the integer-only forward of a ViT
(no float op inside, bit-exact, close to its fake-quant twin)."""
import math

import pytest
import torch
from torch import nn

from slimtorch.errors import IntegerOnlyError
from slimtorch.intops import ivit
from slimtorch.intops.integer_only import FloatOpGuard, IntegerOnlyModel
from slimtorch.zoo.models import TinyViT


def test_shift_exp_by_hand():
    # s = 0.1, x = −15 (−1.5): x·log2e ≈ −15 − 8 + 1 = −22; x0 = −10; q = 2, r = −2;
    # e = ⌊(r − 2x0)·2^(n−q)/2⌋ = 9·2^13 for n = 15, worth 9·2^13·0.1/2^15 = 0.225 ≈ e^−1.5
    e = ivit.shift_exp(torch.tensor([-15, 0, -200]), x0=-10, n=15)
    assert e.tolist() == [9 * 2 ** 13, 10 * 2 ** 15, 0]  # x = 0 gives −x0·2^n; below n·x0: 0
    assert abs(9 * 2 ** 13 * 0.1 / 2 ** 15 - math.exp(-1.5)) < 0.005


def test_exp_base_pre_shift_keeps_resolution_and_sum_budget():
    b = ivit.exp_base(0.07, ivit.SOFTMAX_N, 197)
    assert b.x0 == math.floor(-2 ** b.p / 0.07) and abs(b.x0) >= 2 ** 12
    assert -b.x0 * 2 ** b.n * 197 < 2 ** ivit.SUM_BITS and b.n == ivit.SOFTMAX_N
    assert ivit.exp_base(0.07, 15, 1, "poly").x0 == math.floor(-math.log(2) * 2 ** 5 / 0.07)


@pytest.mark.parametrize("kind,tol", [("shift", 0.025), ("poly", 1 / 128 + 1e-3)])
@pytest.mark.parametrize("s", [0.002, 0.05, 0.2])
def test_shiftmax_close_to_softmax_and_rounded(kind, tol, s):
    x = torch.randint(-127, 128, (32, 50), generator=torch.Generator().manual_seed(0))
    out = ivit.shiftmax(x, ivit.exp_base(s, ivit.SOFTMAX_N, 50, kind))
    ref = torch.softmax(x.double() * s, -1)
    assert (out.double() / 128 - ref).abs().max() < tol
    # rounded, not floored: a row keeps its mass (floor loses ~½ code per token: ~25 of 128)
    assert (out.sum(-1) - 128).abs().max() <= 12


def test_poly_exp_is_ibert_int_exp():
    """Our I-BERT exponential equals transformers' IntSoftmax.int_exp (the reference)."""
    qm = pytest.importorskip("transformers.models.ibert.quant_modules")
    s, x = 0.002, torch.arange(-3000, 1, 7)
    ref, _ = qm.IntSoftmax(8, quant_mode=True).int_exp(x.double(), torch.tensor(s).double())
    b = ivit.exp_base(s, 30, 1, "poly")
    base = ivit.ExpBase("poly", 0, b.x0, 30, b.b, b.c)  # I-BERT's n = 30, no pre-shift
    assert b.p == 0 and torch.equal(ivit.int_exp(x, base), ref.long())


def test_shift_gelu_accuracy_and_the_row_max_bug():
    s = 0.05
    x = torch.arange(-127, 128)[None]  # one row spanning ±6.35
    g = ivit.shift_gelu(x, ivit.exp_base(ivit.GELU_ALPHA * s, ivit.GELU_N, 2)).double() * s / 128
    ref = x.double() * s * torch.sigmoid(ivit.GELU_ALPHA * x.double() * s)
    assert (g - ref).abs().max() <= 127 * s / 128  # σ on a 1/128 grid
    assert abs(g[0, 0]) < 0.01  # the public code's row max gives σ = ½ here: GELU(−6.35) ≈ −3.2
    assert abs(g[0, -1] - 6.35) < 0.06  # and its 31-bit reciprocal σ ≈ 0.96 at x = 6.15


def test_i_layernorm_and_isqrt():
    x = torch.randint(-127, 128, (16, 64), generator=torch.Generator().manual_seed(1))
    out = ivit.i_layernorm(x).double() * math.sqrt(64) / 2 ** 30
    assert (out - torch.nn.functional.layer_norm(x.double(), (64,), eps=0)).abs().max() < 1e-4  # isqrt ±1
    v = torch.cat([torch.arange(0, 5000), torch.randint(0, 2 ** 44, (5000,))])
    assert (ivit.isqrt(v) - v.double().sqrt().floor().long()).abs().max() <= 1
    w, b = torch.tensor([0.5, -2.0]), torch.tensor([0.1, 0.3])
    sign, b_int, scale = ivit.layernorm_affine(w, b, 2)
    norm = torch.tensor([0.7, -1.1])
    y = scale * (sign * torch.round(norm / (math.sqrt(2) / 2 ** 30)) + b_int)
    assert torch.allclose(y.float(), w * norm + b, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyViT(image_size=12, patch=4, dim=32, depth=2, heads=2).eval()
    calib = torch.randn(64, 1, 12, 12)
    return model, IntegerOnlyModel(model, calib[:2]).calibrate([calib[:32], calib[32:]])


def test_integer_region_runs_no_float_op_and_is_bit_exact(tiny):
    model, io = tiny
    x = torch.randn(5, 1, 12, 12)  # another batch size than calibration's
    xq = io.quantize_input(x)
    with FloatOpGuard():
        y1 = io.integer_forward(xq)
    assert y1.codes.dtype == torch.int64 and torch.equal(io.integer_forward(xq).codes, y1.codes)
    with pytest.raises(IntegerOnlyError, match="float op"), FloatOpGuard():
        torch.ones(2) * 0.5


def test_integer_forward_close_to_fake_quant_and_float(tiny):
    model, io = tiny
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        f = model(x)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)
    assert cos(io(x), io.fake(x)) > 0.98 and cos(io(x), f) > 0.97


def test_bad_input_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()).eval()
    with pytest.raises(IntegerOnlyError, match="no integer kernel for aten.sigmoid"):
        IntegerOnlyModel(model, torch.randn(2, 4))
    io = IntegerOnlyModel(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4))
    with pytest.raises(IntegerOnlyError, match="uncalibrated"):
        io(torch.randn(2, 4))
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    with pytest.raises(IntegerOnlyError, match="grouped or dilated"):
        IntegerOnlyModel(conv, torch.randn(2, 4, 6, 6)).calibrate([torch.randn(4, 4, 6, 6)])
    with pytest.raises(IntegerOnlyError, match="exp="):
        IntegerOnlyModel(model, torch.randn(2, 4), exp="taylor")


def test_save_load_is_bit_exact_and_tampering_is_refused(tiny, tmp_path):
    from slimtorch.errors import ArtifactError
    from slimtorch.intops.integer_artifact import load_integer_only, save_integer_only
    model, io = tiny
    save_integer_only(io, tmp_path)
    x = torch.randn(7, 1, 12, 12)
    again = load_integer_only(tmp_path, model)
    assert torch.equal(again(x), io(x))
    raw = (tmp_path / "integer_only.safetensors").read_bytes()
    (tmp_path / "integer_only.safetensors").write_bytes(raw[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="checksum"):
        load_integer_only(tmp_path, model)


def test_python_entry_takes_a_tensor():
    import slimtorch
    torch.manual_seed(0)
    model = TinyViT(image_size=12, patch=4, dim=16, depth=1, heads=2).eval()
    io = slimtorch.integer_only(model, torch.randn(40, 1, 12, 12), exp="poly")
    assert io.frozen and io(torch.randn(3, 1, 12, 12)).shape == (3, 10)
    with pytest.raises(IntegerOnlyError, match="one Tensor input"):
        slimtorch.integer_only(model, [{"input_ids": torch.zeros(2, 3)}])


def test_cli_lower_scores_and_saves(tmp_path, capsys):
    import json

    import slimtorch
    from slimtorch.cli import main
    from slimtorch.data.fashion_mnist import calibration_set
    from slimtorch.zoo.sources import load_model
    qmodel = slimtorch.quantize(load_model("zoo:vit"), "w8a8", calibration_set(64, 0), seed=0)
    slimtorch.save(qmodel, tmp_path / "a")
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"calib_size": 64, "seed": 0}))
    assert main(["lower", str(tmp_path / "a"), "--integer-only", "--test-size", "200",
                 "--quiet"]) == 0
    saved = json.loads((tmp_path / "a" / "integer_only.json").read_text())["metrics"]
    assert saved["integer-only"]["top1"] > 80 and saved["integer-only"]["agree I-ViT fake %"] > 95
    assert main(["lower", str(tmp_path / "a")]) == 2  # without --integer-only: a clear error
    assert "needs --integer-only" in capsys.readouterr().err
