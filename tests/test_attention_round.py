"""Attention Round: the Gaussian-decay level distribution, the τ schedule, hard rounding,
and a run on a small CNN through the reconstruction runner."""
import math

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.algorithms.attention_round import AttentionRound, gaussian_level_probs
from slimtorch.quant.quantizer import Quantizer, fake_quant
from slimtorch.quant.spec import QuantSpec


def _quantizer(w, bits=4):
    q = Quantizer(QuantSpec(bits=bits, granularity="per_channel", observer="minmax"))
    q.calibrate(w)
    return q


def test_level_probabilities_are_gaussian_in_the_distance():
    u = torch.tensor([3.3])
    levels = torch.arange(0.0, 16.0)
    p = gaussian_level_probs(u, levels, 0.7)[0]
    ref = torch.exp(-(levels - 3.3) ** 2 / (2 * 0.49))
    assert torch.allclose(p, ref / ref.sum())
    # log-ratio of two levels is the difference of squared distances over 2τ²
    assert math.log(p[5] / p[3]) == pytest.approx(-((5 - 3.3) ** 2 - (3 - 3.3) ** 2) / 0.98)


def test_samples_follow_the_distribution_and_reach_far_levels():
    w = torch.zeros(1, 20000)
    q = _quantizer(torch.linspace(-1, 1, 16).reshape(1, 16))
    ar = AttentionRound(q, w, tau=1.0)
    ar.start(torch.Generator().manual_seed(0), 100)
    u = torch.full((20000,), 6.4)
    k = ar.sample(u, q)
    levels = torch.arange(0.0, 16.0)
    freq = torch.stack([(k == l).float().mean() for l in levels])
    assert torch.allclose(freq, gaussian_level_probs(torch.tensor([6.4]), levels, 1.0)[0],
                          atol=0.01)
    assert ((k - 6.4).abs() > 2).any()  # not only the two nearest levels
    assert k.min() >= q.qmin and k.max() <= q.qmax


def test_schedule_and_hard_rounding():
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    q = _quantizer(w)
    ar = AttentionRound(q, w, tau=0.5, decay=0.8)
    ar.start(torch.Generator().manual_seed(0), 100)
    ar.at_step(0)
    assert ar.tau == 0.5
    ar.at_step(40)
    assert ar.tau == pytest.approx(0.25)
    ar.at_step(80)
    assert ar.tau == 0.0
    # at τ = 0 (and once hard) it is round-to-nearest of u + z: RTN at the start
    with torch.enable_grad():
        out = ar(q, q.layout(w))
    rtn = fake_quant(w, q.scale, q.zero_point, q.qmin, q.qmax)
    assert torch.allclose(out, rtn, atol=1e-6)
    out.sum().backward()  # straight-through: ∂W̃/∂u = s
    u = ar.v.detach() + q.zero_point
    inside = (u > q.qmin) & (u < q.qmax)
    assert inside.float().mean() > 0.5
    assert torch.allclose(ar.v.grad[inside], q.scale.expand_as(w)[inside])
    assert torch.allclose(ar.commit(w), rtn, atol=1e-6)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x)) + x
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("units", ["block", "layer"])
def test_runs_and_improves_reconstruction(units):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 1, 8, 8)
    recipe = slimtorch.resolve_recipe("w3a8-attention-round").to_dict()
    recipe["methods"] = [{"name": "attention_round", "iters": 60, "units": units}]
    q = slimtorch.quantize(model, recipe, x, seed=0, self_check=False)
    stats = q._slimtorch_meta["methods"][0]["stats"]["per_unit"]
    done = [s for s in stats if "loss_after" in s]
    worst = max(done, key=lambda s: s["loss_before"])  # the 3-bit block (c1 is 8-bit)
    assert worst["loss_after"] < 0.8 * worst["loss_before"]
    assert sum(s["loss_after"] for s in done) < sum(s["loss_before"] for s in done)
    w = q.c2.weight_quantizer
    codes = w.quantize_int(q.c2.weight)
    assert codes.min() >= w.qmin and codes.max() <= w.qmax
