"""Quantizer mechanics: grid, STE, range estimators, granularity, integer round trip."""
import pytest
import torch

from slimtorch.quant.granularity import PerChannel, PerGroup, PerTensor, parse_granularity
from slimtorch.quant.quantizer import (Mode, Quantizer, _best_alpha, fake_quant,
                                       qparams_from_range, qrange, round_ste, search_range)
from slimtorch.recipe import QuantSpec


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(4, False) == (0, 15)
    assert qrange(2, True) == (-2, 1)


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.round(x.detach()))
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quant_formula_asymmetric():
    # s = (hi - lo)/(2^b - 1), z = round(-lo/s); x̂ = s·(clip(round(x/s)+z, 0, 2^b-1) - z)
    lo, hi = torch.tensor([-1.0]), torch.tensor([2.0])
    s, z = qparams_from_range(lo, hi, 2, False)
    assert s.item() == pytest.approx(1.0) and z.item() == 1
    x = torch.tensor([-3.0, -0.6, 0.4, 1.6, 9.0])
    assert torch.equal(fake_quant(x, s, z, 0, 3), torch.tensor([-1.0, -1.0, 0.0, 2.0, 2.0]))


def test_zero_is_exact_and_range_covers_zero():
    s, z = qparams_from_range(torch.tensor([0.5]), torch.tensor([3.0]), 4, False)
    assert fake_quant(torch.zeros(1), s, z, 0, 15).item() == 0.0


def test_symmetric_scale_is_absmax_over_qmax():
    s, z = qparams_from_range(torch.tensor([-2.0]), torch.tensor([1.0]), 8, True)
    assert s.item() == pytest.approx(2.0 / 127) and z.item() == 0


@pytest.mark.parametrize("bits,sym", [(4, False), (2, False), (8, True), (3, True)])
def test_mse_coarse_to_fine_finds_the_full_grid_optimum(bits, sym):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(128, 300, generator=g) * torch.rand(128, 1, generator=g)
    x[:, :3] *= 5  # outliers make clipping worthwhile
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="per_channel", p=2.4)
    lo0, hi0 = x.amin(1), x.amax(1)
    full = _best_alpha(x, spec, lo0, hi0, [torch.full_like(lo0, k / 100) for k in range(1, 101)])
    lo, _ = search_range(x, spec)
    assert torch.allclose(lo, lo0 * full)


def test_mse_beats_minmax_with_outliers():
    x = torch.randn(1, 100_000, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0
    errs = {}
    for obs in ("minmax", "mse"):
        spec = QuantSpec(bits=4, observer=obs)
        s, z = qparams_from_range(*search_range(x, spec), 4, False)
        errs[obs] = (fake_quant(x, s, z, 0, 15) - x).pow(2).mean().item()
    assert errs["mse"] < 0.5 * errs["minmax"]  # measured: 0.157 vs 0.638


def test_percentile_clips():
    x = torch.arange(10001.0)[None]
    lo, hi = search_range(x, QuantSpec(bits=8, observer="percentile", percentile=99.0))
    assert hi.item() == pytest.approx(9900.0) and lo.item() == pytest.approx(100.0)


def test_granularity_parsing_and_errors():
    assert parse_granularity("per_tensor") == PerTensor()
    assert parse_granularity("per_channel") == PerChannel(0)
    assert parse_granularity("per_group(64)") == PerGroup(64)
    assert str(PerGroup(64)) == "per_group(64)"
    with pytest.raises(ValueError, match="per_group"):
        parse_granularity("per_group")
    with pytest.raises(ValueError):
        parse_granularity("per_row")


@pytest.mark.parametrize("gran,shape", [("per_tensor", ()), ("per_channel", (16, 1)),
                                        ("per_group(8)", (16, 4, 1))])
def test_weight_granularity_shapes_and_int_roundtrip(gran, shape):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q = Quantizer(QuantSpec(bits=4, symmetric=True, granularity=gran))
    q.calibrate(w)
    assert tuple(q.scale.shape) == shape
    codes = q.quantize_int(w)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(q.dequantize_int(codes), q(w))  # frozen == fake-quant, exactly
    sqnr = 20 * torch.log10(w.norm() / (q(w) - w).norm())
    assert sqnr > 15  # 4-bit: ~6 dB per bit, minus clipping


def test_per_group_rejects_non_divisor():
    q = Quantizer(QuantSpec(bits=4, granularity="per_group(7)"))
    with pytest.raises(ValueError, match="does not divide"):
        q.calibrate(torch.randn(4, 32))


def test_activation_observer_then_quantize():
    q = Quantizer(QuantSpec(bits=8, observer="mse"), seed=3)
    q.mode = Mode.OBSERVE
    xs = [torch.rand(8, 100) * 6 for _ in range(4)]
    for x in xs:
        assert torch.equal(q(x), x)  # observing passes through
    q.finish_observe()
    assert q.mode is Mode.QUANT and q.zero_point.item() == 0  # one-signed: lo = 0
    y = q(xs[0])
    assert (y - xs[0]).abs().max() <= q.scale.item() / 2 + 1e-6
    assert len(torch.unique(y)) <= 256


def test_bits_out_of_range_is_a_recipe_error():
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(bits=9)
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(bits=1)
