"""Capture, rewrites and the quantize API on small models."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.errors import CalibrationDataError
from slimtorch.graph.capture import capture
from slimtorch.graph.rewrite import ExplicitMultiheadAttention, fold_batchnorm
from slimtorch.quant.modules import QuantConv2d, QuantLinear
from slimtorch.quant.quantizer import Mode
from slimtorch.recipe import Recipe, load_builtin

from conftest import sqnr_db


class TinyAttention(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.ln = h, nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mha = nn.MultiheadAttention(d, h, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, Dh]
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + (p @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_capture_finds_layers_blocks_and_bn(cnn, images):
    g = capture(cnn, images[:4])
    assert [l["fqn"] for l in g.layers] == ["stem", "conv1", "conv2", "fc"]
    assert g.bn_folds == [("stem", "bn0"), ("conv1", "bn1"), ("conv2", "bn2")]
    assert [b["layers"] for b in g.blocks] == [["conv1", "conv2"]]
    assert g.unsupported == []
    assert g.source_of(g.layers[1]["node"]) == "relu"


def test_bn_folding_is_exact(cnn, images):
    ref = cnn(images)
    folded = copy.deepcopy(cnn)
    fold_batchnorm(folded, capture(folded, images[:2]).bn_folds)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(images), ref, atol=1e-5)


def test_mha_decomposition_is_exact():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # B=3, T=5
        mask = torch.zeros(3, 5, dtype=torch.bool)  # [B, S]
        mask[0, -2:] = True
        ref, w = mha(x, x, x, key_padding_mask=mask)
        out, w2 = ExplicitMultiheadAttention(mha)(x, x, x, key_padding_mask=mask)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(w, w2, atol=1e-6)


def test_attention_sites_are_found_and_quantized():
    torch.manual_seed(0)
    m = TinyAttention().eval()
    x = torch.randn(16, 10, 32)
    q = slimtorch.quantize(m, "w8a8", x)
    meta = q._slimtorch_meta
    kinds = sorted(f["kind"] for f in meta["graph"]["functional"])
    assert kinds == ["matmul"] * 4 + ["sdpa"]  # q@k, p@v, mha q@k, mha p@v; one sdpa
    assert len(meta["plan"]["functional"]) == 5
    for qs in q.slimtorch_functional.sites.values():
        assert all(z.mode is Mode.QUANT and z.scale.item() > 0 for z in qs)
    assert isinstance(q.mha, ExplicitMultiheadAttention) and isinstance(q.mha.q_proj, QuantLinear)
    blocks = [b["layers"] for b in meta["graph"]["blocks"]]
    assert ["qkv", "proj"] in blocks and ["fc1", "fc2"] in blocks
    assert ["mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"] in blocks
    assert sqnr_db(m(x), q(x)) > 30


def test_deepcopy_of_quantized_model_with_sites_is_exact():
    """The copy's module-tracker hooks must drive the copy's tracker (they used to point at the
    original's, so the copy named its attention sites wrongly and skipped their quantizers)."""
    torch.manual_seed(0)
    m = TinyAttention().eval()
    x = torch.randn(8, 10, 32)
    q = slimtorch.quantize(m, "w8a8", x)
    c = copy.deepcopy(q)
    with torch.no_grad():
        assert torch.equal(q(x), c(x))
        assert torch.equal(c(x), c(x))
    assert c.slimtorch_functional.tracker is not q.slimtorch_functional.tracker
    c.slimtorch_functional.tracker.close()  # removing the copy's hooks leaves the original's
    assert len(q.slimtorch_functional.tracker.handles) > 0
    with torch.no_grad():
        assert sqnr_db(m(x), q(x)) > 30


class InplaceResidual(nn.Module):
    """Two readers of one tensor (conv1 and a 1x1 shortcut) and an in-place residual add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.short, self.head = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        y += self.short(x)
        return self.head(torch.relu(y))


class ReturnsSum(nn.Module):
    """A residual sum that a conv reads and the model also returns."""

    def __init__(self):
        super().__init__()
        self.conv1, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv1(x) + x
        return self.head(torch.relu(y)), y


def test_returned_residual_sum_is_not_an_add_site():
    """Quantizing an add's operands would change a value the model returns: capture knows the
    model's outputs, so an add read by a conv *and* returned is left alone."""
    x = torch.randn(4, 4, 6, 6)
    graph = capture(ReturnsSum().eval(), x)
    assert not any(s["kind"] == "add" for s in graph.functional)
    assert any(s["kind"] == "add" for s in capture(InplaceResidual().eval(), x).functional)


def test_one_quantizer_per_tensor_and_quantized_residual_add(cnn, images):
    q = slimtorch.quantize(cnn, "w8a8", images)
    plan, sites = q._slimtorch_meta["plan"], q.slimtorch_functional
    adds = [k for k, v in plan["functional"].items() if v["kind"] == "add"]
    assert len(adds) == 1 and plan["shared"] == {f"{adds[0]}#a": "conv1"}  # x + y
    qa, qb = sites.site(adds[0])
    assert qa is q.conv1.input_quantizer and qa is not qb  # skip operand = conv1's input
    seen = []
    sites.tap = lambda key, kind, args, kwargs, out: seen.append((key, args, out))
    with torch.no_grad():
        q(images[:4])
    sites.tap = None
    (key, (a, b), out), = [s for s in seen if s[0] == adds[0]]
    assert torch.equal(out, qa(a) + qb(b))  # Q_a(a) + Q_b(b)
    off = slimtorch.quantize(cnn, Recipe.from_dict({**load_builtin("w8a8").to_dict(),
                                                    "quantize_adds": False}), images)
    assert not any(v["kind"] == "add" for v in off._slimtorch_meta["plan"]["functional"].values())


def test_inplace_residual_add_site():
    torch.manual_seed(0)
    m, x = InplaceResidual().eval(), torch.randn(16, 4, 8, 8)
    q = slimtorch.quantize(m, "w8a8", x)
    plan = q._slimtorch_meta["plan"]
    assert [v["kind"] for v in plan["functional"].values()] == ["add"]
    assert plan["shared"] == {"short": "conv1"}
    key = next(iter(plan["functional"]))
    qa, qb = q.slimtorch_functional.site(key)
    with torch.no_grad():
        y = q.conv2(torch.relu(q.conv1(x)))
        want = q.head(torch.relu(qa(y) + qb(q.short(x))))
        assert torch.equal(q(x), want)
        assert sqnr_db(m(x), q(x)) > 25


def test_quantize_swaps_layers_and_keeps_input_model(cnn, images):
    before = copy.deepcopy(cnn.state_dict())
    q = slimtorch.quantize(cnn, "w8a8", images, seed=0)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert isinstance(q.stem, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert isinstance(q.bn0, nn.Identity)
    assert sqnr_db(cnn(images), q(images)) > 30


def test_first_last_layer_policy_and_overrides(cnn, images):
    q = slimtorch.quantize(cnn, "w2a2", images)
    assert q.stem.weight_quantizer.spec.bits == 8 and q.fc.input_quantizer.spec.bits == 8
    assert q.conv1.weight_quantizer.spec.bits == 2 and q.conv1.input_quantizer.spec.bits == 2
    r = Recipe.from_dict({**load_builtin("w4a4").to_dict(),
                          "overrides": {"conv2": None, "fc": {"weights": 6}}})
    q = slimtorch.quantize(cnn, r, images)
    assert type(q.conv2) is nn.Conv2d
    assert q.fc.weight_quantizer.spec.bits == 6 and q.fc.input_quantizer.spec.bits == 8



def test_depthwise_override_selects_convs_with_one_group_per_channel():
    """``overrides: {depthwise: ...}`` hits every depthwise conv and nothing else (MobileNet's
    3×3 depthwise filters have 9 weights per channel: the layers 4-bit weights hurt most)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, groups=4), nn.Conv2d(16, 4, 1)).eval()
    r = Recipe.from_dict({**load_builtin("w4a8").to_dict(), "first_layer": None,
                          "last_layer": None, "overrides": {"depthwise": {"weights": 8}}})
    q = slimtorch.quantize(model, r, torch.randn(8, 3, 16, 16), self_check=False)
    assert [q[i].weight_quantizer.spec.bits for i in (0, 1, 3, 4)] == [4, 8, 4, 4]

def test_fewer_bits_more_error(cnn, images):
    ref = cnn(images)
    snr = [sqnr_db(ref, slimtorch.quantize(cnn, r, images)(images))
           for r in ("w8a8", "w4a4", "w2a2")]
    assert snr[0] > snr[1] > snr[2]


def test_same_seed_same_model(cnn, images):
    a = slimtorch.quantize(cnn, "w4a4", images, seed=1)
    b = slimtorch.quantize(cnn, "w4a4", images, seed=1)
    assert torch.equal(a(images), b(images))


def test_calibration_item_forms():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y)

    m = Two().eval()
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    for calib in ([(x, y)], [{"x": x, "y": y}]):
        q = slimtorch.quantize(m, "w8a8", calib)
        assert isinstance(q.b, QuantLinear) and torch.allclose(q(x, y=y), m(x, y), atol=0.05)


def test_bad_calibration_data(cnn, images):
    with pytest.raises(CalibrationDataError, match="empty"):
        slimtorch.quantize(cnn, "w8a8", [])
    bad = images.clone()
    bad[40, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationDataError, match="batch 1 contains 1 NaN"):
        slimtorch.quantize(cnn, "w8a8", bad)  # batch size 32 -> sample 40 is in batch 1
    with pytest.raises(CalibrationDataError, match="inf"):
        slimtorch.quantize(cnn, "w8a8", [images[:4], images[:4] / 0])
    with pytest.raises(CalibrationDataError, match="not iterable"):
        slimtorch.quantize(cnn, "w8a8", 3)


def test_capture_does_not_keep_the_forward_intermediates_alive():
    """The recorder maps tensors to nodes by weak reference: a forward's intermediates are
    freed during the recorded forward as they would be without capture (an LLM's
    activations for a batch of sequences would not fit in memory otherwise)."""
    import gc
    import weakref

    from slimtorch.graph.capture import capture

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.alive = []

        def forward(self, x):
            h = torch.relu(self.a(x))
            ref = weakref.ref(h)
            y = self.b(h * 2)
            del h
            gc.collect()
            self.alive.append(ref() is not None)
            return y

    net = Net().eval()
    graph = capture(net, torch.randn(4, 8))
    assert net.alive == [False]
    assert [l["fqn"] for l in graph.layers] == ["a", "b"]
