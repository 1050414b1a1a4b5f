"""Data-free calibration (data.synthetic, data.psaq): the losses against hand computations,
synthesis lowering them, determinism, the recipe / Python / CLI paths and the error."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.cli import main
from slimtorch.data import psaq
from slimtorch.data.synthetic import BNSite, bn_stats_loss, probe, synthesize
from slimtorch.errors import CalibrationDataError, DataFreeError, RecipeError
from slimtorch.quant.prepare import META_ATTR
from slimtorch.recipe import load_recipe_text, resolve_recipe
from slimtorch.zoo.registry import weights_path
from slimtorch.zoo.sources import load_model

from conftest import make_cnn
from test_data import write_idx

needs_zoo = pytest.mark.skipif(not weights_path("resnet20").is_file(),
                               reason="zoo weights not trained")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors, many steps: threads only add overhead here
    yield
    torch.set_num_threads(n)


def test_bn_loss_matches_hand_computation():
    """ZeroQ's loss, element by element: per-sample channel mean and sqrt(unbiased var + 1e-6)
    over the positions, squared distance to the running mean/std, divided by the batch size;
    plus the same term for the input against N(0, 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g)       # the model input [B, C, H, W]
    h = torch.randn(3, 4, 2, 3, generator=g) * 2   # one BN input [B, C', H', W']
    mean, var = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.0, 2.0, 0.5, 4.0])
    expected = 0.0
    for t, m, v in ((x, [0.0, 0.0], [1.0, 1.0]), (h, mean.tolist(), var.tolist())):
        for b in range(t.shape[0]):
            for c in range(t.shape[1]):
                vals = t[b, c].flatten().tolist()
                mu = sum(vals) / len(vals)
                sd = math.sqrt(sum((u - mu) ** 2 for u in vals) / (len(vals) - 1) + 1e-6)
                expected += ((mu - m[c]) ** 2 + (sd - math.sqrt(v[c] + 1e-6)) ** 2) / t.shape[0]
    got = bn_stats_loss([BNSite(h, mean, var)], x).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # batch statistics (Genie/DeepInversion): one [1, C] row over batch and positions
    hb = h.transpose(0, 1).reshape(4, -1)
    exp_b = (((hb.mean(1) - mean) ** 2).sum() + (((hb.var(1) + 1e-6).sqrt()
             - (var + 1e-6).sqrt()) ** 2).sum()).item()
    xb = x.transpose(0, 1).reshape(2, -1)
    exp_b += ((xb.mean(1) ** 2).sum() + (((xb.var(1) + 1e-6).sqrt() - 1) ** 2).sum()).item()
    assert bn_stats_loss([BNSite(h, mean, var)], x, per_sample=False).item() == \
        pytest.approx(exp_b, rel=1e-5)


def _loss_on(model, x):
    return bn_stats_loss(probe(model, x).bn, x).item()


@needs_zoo
def test_synthesis_lowers_bn_loss_and_is_deterministic():
    model = load_model("zoo:resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # the init
    rep = {}
    x = synthesize(model, (1, 28, 28), n=4, seed=3, steps=60, batch_size=4, report=rep)
    assert x.shape == (4, 1, 28, 28) and rep["method"] == "bn-stats"
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(probe(model, x).bn) == n_bn == 21              # every BN input is matched
    assert _loss_on(model, x) < 0.2 * _loss_on(model, x0)      # a numeric floor; measured 0.09×
    assert torch.equal(x, synthesize(model, (1, 28, 28), n=4, seed=3, steps=60, batch_size=4))
    assert not torch.equal(x, synthesize(model, (1, 28, 28), n=4, seed=4, steps=60,
                                         batch_size=4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_kde_and_patch_similarity_entropy_hand_example():
    # two orthogonal patches after the class token: similarities {1, 1, 0, 0}
    attn = torch.tensor([[[[5.0, 5.0], [1.0, 0.0], [0.0, 2.0]]]])  # [B=1, H=1, N=3, Dh=2]
    h = psaq.BANDWIDTH
    peak = 0.5 / math.sqrt(2 * math.pi * h * h) + 1e-4  # half the mass at 0, half at 1
    floor = 1e-4  # grid points 1/9 apart, 11 bandwidths from any sample: density ~ e^-61
    f = lambda p: -p * math.log(p)  # noqa: E731
    expected = (1 / 9) * (f(peak) + 8 * f(floor))  # trapezoid, ends weighted 1/2 each
    assert psaq.patch_similarity_entropy(attn).item() == pytest.approx(expected, rel=1e-4)
    # the KDE is a density: it integrates to 1 over a fine grid
    s = torch.tensor([[0.2, 0.5, 0.55]])
    grid = torch.linspace(0, 1, 2001).unsqueeze(0)
    assert torch.trapezoid(psaq.kde(s, grid), grid).item() == pytest.approx(1.0, abs=1e-4)


class TinyAttn(nn.Module):
    """Patch embedding, one attention block written with F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(1, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.qkv, self.head = nn.Linear(16, 48), nn.Linear(16, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # [B, 16, P] -> [B, P, 16]
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)  # [B, P + 1, 16]
        q, k, v = self.qkv(t).reshape(len(t), -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 2, P + 1, 8]
        return self.head(a.transpose(1, 2).flatten(2)[:, 0])


def test_psaq_on_attention_model_raises_entropy():
    model = TinyAttn().eval()
    x0 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rep = {}
    x = synthesize(model, (1, 16, 16), n=4, steps=60, report=rep)
    assert rep["method"] == "psaq"  # auto: no BN, attention found (sdpa)

    def entropy(t):
        return psaq.patch_similarity_entropy(probe(model, t).attention[0]).item()
    assert entropy(x) > entropy(x0) + 1.0  # measured -2.15 -> -0.19


@pytest.mark.parametrize("name,kwargs,size", [
    ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "embed_dim": 24, "depths": (1, 1),
                                      "num_heads": (1, 2)}, 56),
])
def test_psaq_finds_attention_in_timm_deit_and_swin(name, kwargs, size):
    """timm's attention runs F.scaled_dot_product_attention (Swin: per window); random init."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    assert len(probe(model, torch.zeros(2, 3, size, size)).attention) == 2  # one per block
    rep = {}
    x = synthesize(model, (3, size, size), n=2, steps=4, report=rep)
    assert rep["method"] == "psaq" and x.shape == (2, 3, size, size) and x.isfinite().all()


def test_no_bn_no_attention_is_a_clear_error():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(DataFreeError, match="neither|needs") as e:
        synthesize(plain, (1, 28, 28), n=4)
    assert "BatchNorm" in str(e.value) and "attention" in str(e.value)
    assert "real data" in str(e.value)
    with pytest.raises(DataFreeError, match="psaq"):
        synthesize(make_cnn(), (1, 12, 12), n=4, method="psaq")  # BN but no attention


def _recipe(**calib):
    r = resolve_recipe("w8a8").to_dict()
    r["calib"] = {"source": "data-free", **calib}
    return r


def test_recipe_schema_round_trips_and_rejects_stray_keys():
    text = ("version: 1\nname: df\nweights: {bits: 8}\nactivations: {bits: 8}\n"
            "calib:\n  source: data-free\n  method: bn-stats\n  samples: 64\n  steps: 100\n")
    r = load_recipe_text(text)
    assert r.calib.source == "data-free" and r.calib.samples == 64 and r.calib.steps == 100
    assert resolve_recipe(r.to_dict()) == r  # JSON round trip
    assert resolve_recipe("w8a8").calib.source == "data"
    with pytest.raises(RecipeError, match=r"line 5.*apply to data-free calibration only"):
        load_recipe_text(text.replace("  source: data-free\n", ""))
    with pytest.raises(RecipeError, match="method"):
        load_recipe_text(text.replace("bn-stats", "zeroq"))


def test_quantize_data_free_recipe_equals_saved_set(tmp_path):
    model = make_cnn()
    recipe = _recipe(samples=8, steps=10, shape=[1, 12, 12])
    q = slimtorch.quantize(model, recipe, seed=1)
    cal = getattr(q, META_ATTR)["calibration"]
    assert cal["method"] == "bn-stats" and cal["samples"] == 8 and len(cal["final_loss"]) == 1
    x = synthesize(model, (1, 12, 12), n=8, seed=1, steps=10)  # the same set, made by hand
    torch.save(x, tmp_path / "synthetic.pt")
    q2 = slimtorch.quantize(model, "w8a8", torch.load(tmp_path / "synthetic.pt"), seed=1)
    s1, s2 = q.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(CalibrationDataError, match="calib_data=None"):
        slimtorch.quantize(model, recipe, x)
    with pytest.raises(CalibrationDataError, match="shape"):
        slimtorch.quantize(model, _recipe(samples=8))


@needs_zoo
def test_cli_data_free_reads_no_training_image(tmp_path, capsys, monkeypatch):
    """--calib data-free: the zoo ResNet-20 quantized from synthetic inputs; the data dir holds
    only 5 test images (no train split), so calibration cannot have read real data."""
    from slimtorch.data import synthetic
    monkeypatch.setitem(synthetic.DEFAULTS["bn-stats"], "steps", 3)  # 500 by default
    data = tmp_path / "fm"
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte", 2051,
              torch.arange(5 * 784).reshape(5, 28, 28).remainder(256).to(torch.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte", 2049, torch.arange(5, dtype=torch.uint8))

    def quantize(*extra):
        code = main(["quantize", "--model", "zoo:resnet20", "--recipe", "w8a8", "--data-dir",
                     str(data), "--quiet", "--out", str(tmp_path / "out"), *extra])
        return code, capsys.readouterr()
    code, out = quantize("--calib", "data-free", "--calib-size", "4")
    assert code == 0 and "calib 4 data-free" in out.out
    metrics = (tmp_path / "out" / "metrics.json").read_text()
    assert '"calib_source": "data-free"' in metrics and '"bn-stats"' in metrics
    code, out = quantize("--calib-size", "4")  # real-data calibration needs the train split
    assert code == 2 and "train-images-idx3-ubyte" in out.err
    code = main(["quantize", "--model", "minilm", "--recipe", "w8a8", "--calib", "data-free",
                 "--out", str(tmp_path / "m")])
    assert code == 2 and "does not take images" in capsys.readouterr().err
