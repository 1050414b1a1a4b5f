"""Data-free quantization pieces (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019), as pure functions on BN-folded layers.

Cross-layer equalisation (CLE), for two layers in a row with a positive-homogeneous activation
between them, ``y = W2 f(W1 x + b1)``: scaling channel i of layer 1 by 1/s_i and the matching
input channel of layer 2 by s_i keeps the function, ``f(x / s) = f(x) / s`` for s > 0 and f =
ReLU. With r1_i the range of output channel i of W1 and r2_i that of input channel i of W2,

    s_i = √(r1_i · r2_i) / r2_i    (after it, both ranges are √(r1_i · r2_i)).

Depthwise layers take part with their one input channel per output channel; a layer between
two pairs (expand → depthwise → project) is balanced by iterating over the pairs.
ReLU6 caveat: ``ReLU6(x) / s = clip(x / s, 0, 6 / s)``, so a ReLU6 after a scaled channel must
clip at 6 / s_i to keep the function (``ChannelClamp``); the paper replaced ReLU6 by ReLU.

Bias correction: quantizing W adds an error ε = W_q − W whose expected output shift is
``E[ε x] = ε E[x]`` per output channel; subtracting it from the bias removes the shift. E[x]
comes from calibration data, or data-free from the preceding BN's (β, γ) through the clipped
normal ``clip_mean``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def out_channel_ranges(w: Tensor) -> Tensor:
    """max |w| per output channel: ``[O, ...] -> [O]``."""
    return w.detach().abs().flatten(1).amax(1)


def in_channel_ranges(w: Tensor, groups: int = 1) -> Tensor:
    """max |w| per input channel of a (grouped) conv / linear weight ``[O, I/g, ...] -> [I]``."""
    o, i_g = w.shape[:2]
    a = w.detach().abs().reshape(groups, o // groups, i_g, -1)  # [g, O/g, I/g, k]
    return a.amax(dim=(1, 3)).reshape(groups * i_g)  # [g, I/g] -> [I]


def equalization_scales(r1: Tensor, r2: Tensor) -> Tensor:
    """s_i = √(r1_i · r2_i) / r2_i; 1 where either range is 0 (nothing to balance)."""
    s = torch.sqrt(r1 * r2) / r2
    return torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))


def _in_shape(layer: nn.Module, s: Tensor) -> Tensor:
    """``s`` over the input channels, shaped to multiply ``layer.weight`` ``[O, I/g, ...]``."""
    w, groups = layer.weight, getattr(layer, "groups", 1)
    o, i_g = w.shape[:2]
    s = s.reshape(groups, 1, i_g).expand(groups, o // groups, i_g).reshape(o, i_g)
    return s.reshape(o, i_g, *([1] * (w.dim() - 2)))


@torch.no_grad()
def scale_pair(layer1: nn.Module, layer2: nn.Module, s: Tensor) -> None:
    """Divide output channel i of ``layer1`` (weight and bias) by s_i, multiply input channel i
    of ``layer2`` by s_i (in place)."""
    layer1.weight.div_(s.reshape(-1, *([1] * (layer1.weight.dim() - 1))))
    if layer1.bias is not None:
        layer1.bias.div_(s)
    layer2.weight.mul_(_in_shape(layer2, s))


def equalize_pair(layer1: nn.Module, layer2: nn.Module) -> Tensor:
    """One CLE step on a pair; returns the scales applied."""
    s = equalization_scales(out_channel_ranges(layer1.weight),
                            in_channel_ranges(layer2.weight, getattr(layer2, "groups", 1)))
    scale_pair(layer1, layer2, s)
    return s


def equalize(pairs: list[tuple[nn.Module, nn.Module]], iters: int = 20, tol: float = 1e-3
             ) -> list[Tensor]:
    """CLE over ``pairs`` until no scale moves more than ``tol`` (in log) or ``iters`` sweeps;
    returns each pair's total scale (what its activation's clip bound must be divided by)."""
    total = [torch.ones(a.weight.shape[0]) for a, _ in pairs]
    for _ in range(iters):
        worst = 0.0
        for k, (a, b) in enumerate(pairs):
            s = equalize_pair(a, b)
            total[k] = total[k] * s
            worst = max(worst, s.log().abs().max().item())
        if worst < tol:
            break
    return total


class ChannelClamp(nn.Module):
    """``clip(x, 0, upper_c)`` per channel of ``[B, C, ...]``: ReLU6 after CLE scaled channel c by
    1 / s_c, with ``upper = 6 / s``, so the equalised network computes the same function."""

    def __init__(self, upper: Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.minimum(F.relu(x), self.upper.reshape(shape))


def clip_mean(mu: Tensor, sigma: Tensor, lo: float = 0.0, hi: float = math.inf) -> Tensor:
    """E[clip(X, lo, hi)] for X ~ N(mu, sigma²) (ReLU: lo 0; ReLU6: hi 6):
    lo·Φ(α) + hi·(1 − Φ(β)) + mu·(Φ(β) − Φ(α)) + sigma·(φ(α) − φ(β)), α = (lo − mu)/sigma,
    β = (hi − mu)/sigma (terms with an infinite bound vanish)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf_a, pdf_b = normal.log_prob(a).exp(), normal.log_prob(b).exp()
    hi_term = 0.0 if math.isinf(hi) else hi * (1 - cdf_b)
    return lo * cdf_a + hi_term + mu * (cdf_b - cdf_a) + sigma * (pdf_a - pdf_b)


def output_shift(w: Tensor, w_q: Tensor, in_mean: Tensor, groups: int = 1) -> Tensor:
    """E[(W_q − W) x] per output channel, for inputs with per-channel mean ``in_mean`` ``[I]``
    (spatially constant; zero padding at the borders is ignored): ``[O]``."""
    o, i_g = w.shape[:2]
    err = (w_q - w).detach().reshape(o, i_g, -1).sum(2)  # [O, I/g]: kernel taps summed
    mean = in_mean.reshape(groups, 1, i_g).expand(groups, o // groups, i_g).reshape(o, i_g)
    return (err * mean).sum(1)


@torch.no_grad()
def correct_bias(layer: nn.Module, w_float: Tensor, in_mean: Tensor) -> Tensor:
    """Subtract the expected output shift of ``layer``'s (already quantized) weight from its
    bias, given the float weight it replaced; returns the shift."""
    shift = output_shift(w_float, layer.weight, in_mean, getattr(layer, "groups", 1))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift))
    layer.bias.sub_(shift)
    return shift


PAIR_ACTIVATIONS = {"relu", "relu6"}
ZERO_PRESERVING = {"pad"}  # zero padding commutes with per-channel scaling


def equalizable_pairs(graph) -> list[tuple[str, str, str | None]]:
    """(layer1 fqn, layer2 fqn, fqn of the activation module between them or None) for every
    conv/linear whose output is read only by one other conv/linear, through at most ReLU/ReLU6
    and zero padding (``graph``: a QuantGraph of the BN-folded model)."""
    from ..graph.capture import users_of
    nodes, users = graph.nodes, users_of(graph.nodes)
    layer_at = {l["node"]: l["fqn"] for l in graph.layers if l["type"] in ("Conv2d", "Linear",
                                                                           "Conv1d")}
    pairs = []
    for start, fqn in layer_at.items():
        idx, act = start, None
        while len(users.get(idx, [])) == 1:
            r = nodes[users[idx][0]]
            if r.kind in PAIR_ACTIVATIONS and act is None:
                idx, act = r.idx, r.module
            elif r.kind == "other" and r.op in ZERO_PRESERVING:
                idx = r.idx
            else:
                if r.idx in layer_at and r.inputs and r.inputs[0] == idx:
                    pairs.append((fqn, layer_at[r.idx], act))
                break
    return pairs
