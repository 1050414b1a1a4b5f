"""Self-check after quantization: output and per-layer SQNR against the float model."""
import math
import warnings

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.eval.selfcheck import (QuantizationCheckError, QuantizationCheckWarning, check,
                                      sqnr_db)


def test_sqnr_formula():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, -ref) == pytest.approx(10 * math.log10(25 / 100))  # -6.02 dB
    assert sqnr_db(ref, torch.tensor([float("nan"), 0.0])) == -math.inf


def test_w8a8_passes_and_report_is_in_meta(cnn, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationCheckWarning)
        q = slimtorch.quantize(cnn, "w8a8", images)
    sc = q._slimtorch_meta["self_check"]
    assert sc["passed"] and sc["output_sqnr_db"] > 25 and sc["output_cosine"] > 0.99
    assert len(sc["worst_layers"]) == 4  # stem, conv1, conv2, fc
    report = slimtorch.inspect(q, cnn, images[:16])
    assert [l.name for l in report.layers] == ["stem", "conv1", "conv2", "fc"]
    # a layer's error cannot be smaller than its own: cumulative SQNR ≤ own SQNR (+ slack)
    for layer in report.layers:
        assert layer.cumulative_sqnr_db <= layer.own_sqnr_db + 3
        assert 20 < layer.own_sqnr_db < 80
    assert report.layers[0].cumulative_sqnr_db == pytest.approx(report.layers[0].own_sqnr_db)


def test_broken_layer_is_named(cnn, images):
    q = slimtorch.quantize(cnn, "w8a8", images)
    with torch.no_grad():
        q.conv2.weight.neg_()  # sabotage one layer: its output flips sign
    report = check(q, cnn, images[:16], min_sqnr_db=10)
    worst = report.worst(1)[0]
    assert worst.name == "conv2" and worst.own_sqnr_db < 5  # (bias kept: not -6 dB)
    by_name = {l.name: l for l in report.layers}
    assert by_name["conv1"].cumulative_sqnr_db > 25  # everything before it is fine
    assert by_name["conv2"].cumulative_sqnr_db < 5
    assert report.output_sqnr_db < 10 and not report.passed and "conv2" in report.table(1)


def test_below_floor_warns_and_strict_raises(cnn, images):
    with pytest.warns(QuantizationCheckWarning, match="Layers with the largest own error"):
        slimtorch.quantize(cnn, "w8a8", images, min_sqnr_db=500)
    with pytest.raises(QuantizationCheckError, match="BELOW the 500 dB floor"):
        slimtorch.quantize(cnn, "w8a8", images, min_sqnr_db=500, strict=True)
    q = slimtorch.quantize(cnn, "w8a8", images, self_check=False)
    assert "self_check" not in q._slimtorch_meta


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, scale=1.0):
        h = torch.relu(self.a(x))
        return {"h": h * scale, "y": self.b(h)}


def test_dict_outputs_and_keyword_inputs():
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    data = [{"x": torch.randn(16, 8), "scale": 2.0} for _ in range(2)]
    q = slimtorch.quantize(model, "w8a8", data)
    report = check(q, model, data[0])
    assert report.passed and {l.name for l in report.layers} == {"a", "b"}


def test_default_floor_by_bit_width():
    from slimtorch.eval.selfcheck import default_floor
    from slimtorch.recipe import resolve_recipe
    assert default_floor(resolve_recipe("w8a8")) == 6.0
    assert default_floor(resolve_recipe("w4a8")) == default_floor(resolve_recipe("w2a2")) == 0.0


class InplaceAct(nn.Module):
    """conv → BN → ReLU(inplace): after folding, the ReLU clamps the conv's output tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.act, self.head = nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def test_own_sqnr_survives_inplace_ops():
    torch.manual_seed(0)
    model = InplaceAct().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)  # some outputs negative: the ReLU changes them
    data = torch.randn(8, 3, 12, 12)
    q = slimtorch.quantize(model, "w8a8", data)
    report = check(q, model, data)
    assert q.bn.__class__ is nn.Identity  # folded: the ReLU now acts on the conv's own output
    for layer in report.layers:  # an 8-bit layer alone is far better than 0 dB
        assert layer.own_sqnr_db > 25, layer


def test_check_holds_at_most_its_budget_of_samples(cnn, images):
    """On a large model the check runs on the first samples only (``held_samples``): as many
    as keep both models' layer inputs and outputs within the budget; the report says how many."""
    from slimtorch.eval.selfcheck import held_samples
    names = {"stem", "conv1", "conv2", "fc"}
    assert held_samples(cnn, names, images[:8]) is not None
    assert held_samples(cnn, names, images[:8]).shape[0] == 8           # fits: all of it
    assert held_samples(cnn, names, images[:8], budget=1).shape[0] == 1  # nothing fits: one
    one = held_samples(cnn, names, images[:1], budget=1)
    assert one.shape[0] == 1
    # the budget for exactly three samples' worth of records (float + quantized) keeps three
    per_sample = []
    hooks = [m.register_forward_hook(lambda m, a, o: per_sample.append(
        a[0].numel() * 4 + o.numel() * 4)) for n, m in cnn.named_modules() if n in names]
    with torch.no_grad():
        cnn(images[:1])
    for h in hooks:
        h.remove()
    budget = 3 * 2 * sum(per_sample)
    assert held_samples(cnn, names, images[:8], budget=budget).shape[0] == 3
    q = slimtorch.quantize(cnn, "w8a8", images[:8])
    assert q._slimtorch_meta["self_check"]["samples"] == 8
