"""DFQ pieces (algorithms/dfq.py): the CLE scale formula, function preservation (ReLU, and ReLU6
with per-channel clip bounds), the clipped-normal mean and the bias-correction shift."""
import math

import pytest
import torch
from torch import nn

from slimtorch.algorithms import dfq


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_scale_formula_balances_ranges():
    r1, r2 = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = dfq.equalization_scales(r1, r2)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0]))  # √(r1 r2) / r2; 1 when r1 = 0
    assert torch.allclose((r1 / s)[:2], (r2 * s)[:2])  # both become √(r1 r2) = 2


def test_in_channel_ranges_grouped():
    w = torch.arange(24.0).reshape(4, 3, 2)  # [O=4, I/g=3, k]; groups=2 -> I=6
    r = dfq.in_channel_ranges(w, groups=2)
    assert r.tolist() == [7.0, 9.0, 11.0, 19.0, 21.0, 23.0]  # w[o, i, k] = 6o + 2i + k
    dw = torch.randn(5, 1, 3, 3, generator=_gen())
    assert torch.equal(dfq.in_channel_ranges(dw, groups=5), dfq.out_channel_ranges(dw))


def _chain(act):
    g = _gen(1)
    convs = [nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)]
    for c in convs:  # uneven channel ranges, as BN folding leaves them
        c.weight.data = torch.randn(c.weight.shape, generator=g) * torch.rand(
            c.weight.shape[0], 1, 1, 1, generator=g).mul(5)
        c.bias.data = torch.randn(c.bias.shape, generator=g)
    return nn.Sequential(convs[0], act(), convs[1], act(), convs[2])


def test_cle_keeps_function_and_equalises_relu():
    net = _chain(nn.ReLU)
    x = torch.randn(2, 3, 6, 6, generator=_gen(2))
    ref = net(x)
    pairs = [(net[0], net[2]), (net[2], net[4])]
    dfq.equalize(pairs, iters=50, tol=1e-6)
    assert torch.allclose(net(x), ref, atol=1e-4, rtol=1e-4)
    for a, b in pairs:
        r1 = dfq.out_channel_ranges(a.weight)
        r2 = dfq.in_channel_ranges(b.weight, b.groups)
        assert torch.allclose(r1, r2, rtol=1e-3)


def test_relu6_needs_channel_clamp():
    net = _chain(nn.ReLU6)
    x = 3 * torch.randn(2, 3, 6, 6, generator=_gen(3))
    ref = net(x)
    scales = dfq.equalize([(net[0], net[2]), (net[2], net[4])], iters=50, tol=1e-6)
    assert not torch.allclose(net(x), ref, atol=1e-3)  # plain ReLU6 no longer matches
    net[1], net[3] = dfq.ChannelClamp(6.0 / scales[0]), dfq.ChannelClamp(6.0 / scales[1])
    assert torch.allclose(net(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hi", [math.inf, 6.0])
def test_clip_mean_matches_sampling(hi):
    mu, sigma = torch.tensor([-1.0, 0.5, 4.0]), torch.tensor([1.0, 2.0, 3.0])
    z = torch.randn(400_000, 3, generator=_gen(4))
    mc = (mu + sigma * z).clamp(0.0, hi).mean(0)
    assert torch.allclose(dfq.clip_mean(mu, sigma, 0.0, hi), mc, atol=0.02)
    if math.isinf(hi):  # E[ReLU(X)] = mu Φ(mu/σ) + σ φ(mu/σ)
        n = torch.distributions.Normal(0.0, 1.0)
        closed = mu * n.cdf(mu / sigma) + sigma * n.log_prob(mu / sigma).exp()
        assert torch.allclose(dfq.clip_mean(mu, sigma), closed, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_removes_mean_shift(groups):
    conv = nn.Conv2d(4, 8, 3, groups=groups)
    w = conv.weight.detach().clone()
    mean = torch.tensor([0.5, 1.0, 2.0, 3.0])
    x = mean.reshape(1, 4, 1, 1).expand(1, 4, 5, 5)  # constant input: no border effects
    ref = conv(x)
    conv.weight.data = torch.round(w * 4) / 4  # a coarse "quantized" weight
    shift = dfq.output_shift(w, conv.weight, mean, groups)
    assert torch.allclose(conv(x) - ref, shift.reshape(1, 8, 1, 1).expand_as(ref), atol=1e-5)
    dfq.correct_bias(conv, w, mean)
    assert torch.allclose(conv(x), ref, atol=1e-5)


def test_equalizable_pairs_from_graph():
    from slimtorch.graph.capture import capture
    net = _chain(nn.ReLU6).eval()
    pairs = dfq.equalizable_pairs(capture(net, torch.randn(1, 3, 6, 6)))
    assert pairs == [("0", "2", "1"), ("2", "4", "3")]
