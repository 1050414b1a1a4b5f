"""Integer execution in PyTorch: dyadic multipliers, int8 matmul, IntLinear vs fake quant."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.intops import (IntLinear, dyadic, int8_eligible, int8_matmul, lower_to_int8,
                              lowering_summary, requantize)
from slimtorch.intops import matmul as matmul_mod
from slimtorch.intops.dyadic import dyadic_value
from slimtorch.intops.matmul import reference_int_matmul
from slimtorch.quant.quantizer import Quantizer
from slimtorch.recipe import QuantSpec
from slimtorch.zoo.models import TinyViT


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(256, 48, generator=torch.Generator().manual_seed(3))


def test_dyadic_error_bound():
    g = torch.Generator().manual_seed(0)
    mult = torch.exp(torch.empty(10_000, dtype=torch.float64).uniform_(-21, 5, generator=g))
    m, k = dyadic(mult)
    assert torch.all((m >= 2 ** 30) & (m < 2 ** 31)) and torch.all((k >= 1) & (k <= 62))
    err = (dyadic_value(m, k) - mult).abs()
    assert torch.all(err <= 2.0 ** -(k.double() + 1))  # half a unit in the last place
    assert torch.all(err <= mult * 2.0 ** -31)  # relative error below 2^-31
    m, k = dyadic(torch.tensor([1e-15]))  # shift capped at 62 bits: fewer mantissa bits
    assert k.item() == 62 and abs(dyadic_value(m, k).item() - 1e-15) <= 2.0 ** -63 * 1.001


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_dyadic_rejects_bad_multipliers(bad):
    with pytest.raises(ValueError):
        dyadic(torch.tensor([bad]))


def test_requantize_is_rounding_within_one_code():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-2 ** 30, 2 ** 30, (5000, 4), generator=g, dtype=torch.int32)
    mult = torch.tensor([1.7e-7, 3.1e-8, 9.9e-9, 2.2e-7], dtype=torch.float64)
    m, k = dyadic(mult)
    codes = requantize(acc, m, k, 7, -128, 127)
    ref = torch.clamp(torch.round(acc.double() * mult) + 7, -128, 127)
    assert (codes.double() - ref).abs().max() <= 1
    assert (codes.double() != ref).float().mean() < 1e-3  # only at ties / last-bit cases


@pytest.mark.parametrize("shape", [(1, 16, 8), (3, 5, 7), (64, 384, 96), (17, 64, 33)])
def test_int8_matmul_exact(shape):
    mm, kk, nn_ = shape
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (mm, kk), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (kk, nn_), generator=g, dtype=torch.int8)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), reference_int_matmul(a, b))


def test_int8_matmul_falls_back_when_int_mm_refuses(monkeypatch):
    def refuse(a, b):
        raise RuntimeError("_int_mm: unsupported shape")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    monkeypatch.setattr(matmul_mod, "_SUPPORTED", {})
    a = torch.randint(-128, 128, (5, 1000), dtype=torch.int8)
    b = torch.randint(-128, 128, (1000, 3), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b).long(), reference_int_matmul(a, b))


def test_int_linear_matches_fake_quant(x):
    q = slimtorch.quantize(mlp(), "w8a8", x)
    for layer, inp in ((q[0], x), (q[2], F.gelu(q[0](x)))):
        ref = layer(inp)
        out = IntLinear(layer)(inp)
        step = layer.input_quantizer.scale * layer.weight_quantizer.scale.max()
        # same integers; only the float rounding of the fake-quant accumulation differs
        assert (out - ref).abs().max() <= 1e-3 * step * layer.in_features
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int_linear_requantised_within_one_step(x):
    q = slimtorch.quantize(mlp(), "w8a8", x)
    layer = q[0]
    ref = layer(x)
    out_q = Quantizer(QuantSpec(bits=8, observer="minmax"))
    out_q.set_range(ref.min().reshape(1), ref.max().reshape(1), like=ref)
    y = IntLinear(layer, out_quantizer=out_q)(x)
    step = float(out_q.scale)
    assert (y - out_q.fake_quant(ref)).abs().max() <= step * (1 + 1e-4)
    assert (y - ref).abs().max() <= step * (0.5 + 1e-3) + 1e-6  # plus the grid's own rounding


def test_lower_to_int8_swaps_eligible_layers(x):
    q = slimtorch.quantize(mlp(), "w8a8", x)
    ref = q(x)
    out = lower_to_int8(q)
    assert out is q and lowering_summary(q) == {"int8": ["0", "2", "4"], "packed": [],
                                              "fake_quant": []}
    y = q(x)
    assert (y.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert (y - ref).abs().max() <= 0.05 * ref.abs().max()


def test_ineligible_layers_stay_fake_quant(x):
    q = slimtorch.quantize(mlp(), "w4a4", x)  # asymmetric weights: not int8-symmetric
    reasons = {fqn: int8_eligible(m) for fqn, m in q.named_modules() if fqn in ("0", "2", "4")}
    lower_to_int8(q)
    summary = lowering_summary(q)
    assert set(summary["int8"]) == {f for f, r in reasons.items() if r is None}
    for item in summary["fake_quant"]:
        assert item["reason"] == reasons[item["layer"]]
    with pytest.raises(ValueError, match="cannot lower"):
        IntLinear(nn.Linear(4, 4))


def test_lowered_attention_model_keeps_functional_sites():
    torch.manual_seed(0)
    vit = TinyViT(image_size=12, patch=4, dim=32, depth=1, heads=2).eval()
    imgs = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    q = slimtorch.quantize(vit, "w8a8", imgs)
    ref = q(imgs)
    lower_to_int8(q)
    assert len(lowering_summary(q)["int8"]) == 5  # qkv, proj, mlp.0, mlp.2, head
    y = q(imgs)
    assert (y - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-5


class ResidualMLP(nn.Module):
    """A residual add read by a Linear: an add site in the same module as lowered layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(48, 48), nn.Linear(48, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x))) + x))


def test_lowering_keeps_residual_add_site(x):
    torch.manual_seed(0)
    q = slimtorch.quantize(ResidualMLP().eval(), "w8a8", x)
    key = next(k for k, v in q._slimtorch_meta["plan"]["functional"].items()
               if v["kind"] == "add")
    ref = q(x)
    lower_to_int8(q)
    assert len(lowering_summary(q)["int8"]) == 3
    hits = []
    q.slimtorch_functional.tap = lambda k, *rest: hits.append(k)
    y = q(x)
    assert hits == [key]  # IntLinear's own adds do not shift the site count of the root
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
