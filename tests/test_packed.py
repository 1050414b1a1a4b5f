"""PackedLinear: weight-only layers on PyTorch's packed int4/int8 CPU kernels vs fake quant."""
import copy

import pytest
import torch
from torch import nn

from slimtorch.intops import PackedLinear, lower_packed, lowering_summary, packed_eligible
from slimtorch.quant.modules import QuantLinear
from slimtorch.quant.spec import QuantSpec

from test_dynamic import quantized
from test_smoothquant import HELD, out

SPECS = {
    "w4 sym g64": dict(bits=4, symmetric=True, granularity="per_group(64)"),
    "w4 asym g32": dict(bits=4, symmetric=False, granularity="per_group(32)"),
    "w4 sym per-channel": dict(bits=4, symmetric=True, granularity="per_channel"),
    "w3 sym g64": dict(bits=3, symmetric=True, granularity="per_group(64)"),
    "w2 asym per-tensor": dict(bits=2, symmetric=False, granularity="per_tensor"),
    "w8 sym per-channel": dict(bits=8, symmetric=True, granularity="per_channel"),
    "w6 sym per-tensor": dict(bits=6, symmetric=True, granularity="per_tensor"),
}


def frozen_layer(spec: dict, in_f=192, out_f=48, bias=True, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    q = QuantLinear.from_module(lin, QuantSpec(observer="minmax", **spec), None)
    q.calibrate_weight()
    q.freeze()
    return q.eval()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_identity_input_reads_back_the_dequantized_weights(name):
    """x = I gives y = Wᵀ: the packed codes, scales and offsets reproduce w = (q − z)·s up to
    the bf16 rounding of the scale/offset (relative 2⁻⁸ of a group's largest weight)."""
    layer = frozen_layer(SPECS[name], bias=False)
    packed = PackedLinear(layer)
    with torch.no_grad():
        w_back = packed(torch.eye(layer.in_features)).t()  # [O, I]
    w = layer.weight  # the exact dequantisation of the codes
    tol = w.abs().amax() * 2 ** -7
    assert (w_back - w).abs().max() <= tol
    # and it is the quantized weight, not the float one: a 4-bit grid has few levels
    if SPECS[name]["bits"] <= 4:
        assert torch.unique(layer.weight_int).numel() <= 2 ** SPECS[name]["bits"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_packed_output_matches_fake_quant(name):
    layer = frozen_layer(SPECS[name])
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_fq, y_pk = layer(x), PackedLinear(layer)(x)
    assert y_pk.shape == y_fq.shape and y_pk.dtype == torch.float32
    # model code that reads .weight (T5 casts by wo.weight.dtype) sees the fake-quant weight
    assert torch.equal(PackedLinear(layer).weight, layer.weight)
    # bf16 inputs/outputs: ~2⁻⁹ relative, far below the weight quantization error
    assert (y_pk - y_fq).abs().max() <= 0.02 * y_fq.abs().max()


def test_ineligible_layers_say_why():
    assert "multiple of 16" in packed_eligible(frozen_layer(SPECS["w4 sym g64"], out_f=40))
    assert "multiple of 32" in packed_eligible(frozen_layer(SPECS["w8 sym per-channel"],
                                                            in_f=48))
    assert "5–8-bit" in packed_eligible(frozen_layer(
        dict(bits=8, symmetric=False, granularity="per_channel")))
    assert "group size" in packed_eligible(frozen_layer(
        dict(bits=4, symmetric=True, granularity="per_group(96)")))
    torch.manual_seed(0)
    unfrozen = QuantLinear.from_module(nn.Linear(64, 32), QuantSpec(bits=4), None)
    assert "frozen" in packed_eligible(unfrozen)
    with pytest.raises(ValueError, match="multiple of 16"):
        PackedLinear(frozen_layer(SPECS["w4 sym g64"], out_f=40))


def test_lower_packed_runs_a_weight_only_llm():
    """Every weight-only Linear of a tiny Llama (W4 g64 RTN) is packed; the logits stay within
    a small fraction of the quantization error of the fake-quant model."""
    m, q = quantized({"name": "t", "methods": ["rtn"], "quantize_embeddings": False,
                      "weights": {"bits": 4, "symmetric": True, "granularity": "per_group(32)",
                                  "observer": "minmax"}, "last_layer": {"weights": None}})
    lowered = lower_packed(copy.deepcopy(q))
    summary = lowering_summary(lowered)
    n_linear = sum(isinstance(mod, nn.Linear) for mod in m.modules())
    assert len(summary["packed"]) == n_linear - 1  # all but the float lm_head
    assert summary["int8"] == [] and summary["fake_quant"] == []
    with torch.no_grad():
        y_fq, y_pk = q(**HELD).logits, lowered(**HELD).logits
    e_q = (y_fq - out(m, HELD)).pow(2).mean()
    assert (y_pk - y_fq).pow(2).mean() < 0.02 * e_q
    assert (y_pk.argmax(-1) == y_fq.argmax(-1)).float().mean() > 0.95


def test_w8a8_layers_are_not_packed():
    _, q = quantized("w8a8-dynamic")
    assert lowering_summary(lower_packed(copy.deepcopy(q)))["packed"] == []
    layers = [mod for mod in q.modules() if isinstance(mod, QuantLinear)]
    assert layers and all("input quantized" in packed_eligible(mod) for mod in layers)
