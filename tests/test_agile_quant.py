"""Agile-Quant: the log2 softmax quantizer's formula, the recipe's quantizer layout on a tiny
Llama (per-channel Linear inputs, per-head Q/K/V, log2 probabilities, float head), GPTQ after
it, and the save/load round trip."""
import math
import warnings

import pytest
import torch

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.quant.granularity import PerChannel, parse_granularity
from slimtorch.quant.kinds import make_quantizer
from slimtorch.quant.log2 import Log2Quantizer
from slimtorch.quant.prepare import META_ATTR
from slimtorch.quant.quantizer import Mode
from slimtorch.quant.spec import QuantSpec
from slimtorch.recipe import load_builtin, resolve_recipe

transformers = pytest.importorskip("transformers")
from test_smoothquant import tiny_llama, tokens  # noqa: E402

CALIB = [tokens(k, 4, 24) for k in range(3)]
HELD = tokens(100, 2, 24)


def quantized(model, recipe="w4a8-agile-quant", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimtorch.quantize(model, recipe, CALIB, **kw)


def test_log2_quantizer_pins_the_formula():
    q = make_quantizer(QuantSpec(bits=4, kind="log2"))
    assert isinstance(q, Log2Quantizer)
    q.mode = Mode.OBSERVE
    q(torch.rand(10))
    q.finish_observe()
    x = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.26, 0.2, 1e-3, 2.0 ** -15, 2.0 ** -15.6, 0.0])
    k = [0, 1, 1, 2, 2, 2, 10, 15, 16, None]  # round(−log2 x); None: x = 0
    want = torch.tensor([0.0 if kk is None or kk > 15 else 2.0 ** -kk for kk in k])
    assert torch.equal(q(x), want)
    # by hand: −log2 0.7 = 0.515 → 1; −log2 0.3 = 1.74 → 2; −log2 0.26 = 1.94 → 2
    assert q(torch.tensor([0.7])).item() == 0.5 and q(torch.tensor([0.26])).item() == 0.25
    assert torch.equal(q.dequantize_int(q.quantize_int(x)), want)
    assert q.quantize_int(torch.tensor([0.0])).item() == 16  # the code 2^b stands for zero


def test_per_channel_axis_parses_for_activations():
    assert parse_granularity("per_channel(-1)") == PerChannel(-1)
    assert str(PerChannel(-1)) == "per_channel(-1)"
    with pytest.raises(ValueError, match="per_group"):
        parse_granularity("per_group(-4)")


def test_recipe_layout_on_tiny_llama():
    m = tiny_llama()
    q = quantized(m)
    meta = getattr(q, META_ATTR)
    layers = meta["plan"]["layers"]
    assert "lm_head" not in layers and not any("embed" in f for f in layers)
    assert len(layers) == 2 * 7  # q/k/v/o/gate/up/down of two decoder layers
    for fqn, spec in layers.items():
        assert spec["weights"]["granularity"] == "per_group(64)" and spec["weights"]["bits"] == 4
        assert spec["activations"]["granularity"] == "per_channel(-1)"
        assert spec["activations"]["symmetric"] and not spec["activations"]["dynamic"]
        sc = q.get_submodule(fqn).input_quantizer.scale
        assert sc.shape == (1, 1, q.get_submodule(fqn).in_features)  # one scale per feature
    sites = meta["plan"]["functional"]
    assert len(sites) == 2 and all(s["kind"] == "sdpa" for s in sites.values())
    for key, s in sites.items():
        assert s["roles"]["probs"]["kind"] == "log2" and s["roles"]["probs"]["bits"] == 4
        for r in "qkv":
            assert s["roles"][r]["granularity"] == "per_channel(1)"
        qs = q.slimtorch_functional.site(key)
        assert qs[0].scale.shape == (1, 4, 1, 1)  # 4 query heads
        assert qs[1].scale.shape[1] in (2, 4)     # K: 2 KV heads (or repeated to 4)
    assert [r["name"] for r in meta["methods"]] == ["agile_quant", "gptq"]
    st = meta["methods"][0]["stats"]
    assert st["log2_softmax_sites"] == 2 and st["per_head_qkv"] == 6


def test_log2_probabilities_stay_causal():
    """A future token cannot change the logits of earlier positions (masked probabilities are
    exact zeros on the log2 grid, not 2^−15)."""
    m = tiny_llama()
    q = quantized(m, self_check=False)
    a = HELD["input_ids"].clone()
    b = a.clone()
    b[:, -1] = (b[:, -1] + 7) % 128
    with torch.no_grad():
        la, lb = q(input_ids=a).logits, q(input_ids=b).logits
    assert torch.equal(la[:, :-1], lb[:, :-1])


def test_quantized_beats_a_per_tensor_grid_and_round_trips(tmp_path):
    m = tiny_llama()
    q = quantized(m)
    with torch.no_grad():
        ref = m(**HELD).logits
        e_q = (q(**HELD).logits - ref).pow(2).mean()
    assert 10 * math.log10(ref.pow(2).mean() / e_q) > 10  # SQNR floor on the random model
    # activation grids alone (8-bit weights): per channel beats one scale per tensor, since
    # the norm outlier channels (×20) want their own scales
    errs = {}
    for gran in ("per_channel(-1)", "per_tensor"):
        r = load_builtin("w4a8-agile-quant").to_dict()
        r["weights"]["bits"], r["activations"]["granularity"] = 8, gran
        with torch.no_grad():
            errs[gran] = (quantized(m, resolve_recipe(r))(**HELD).logits - ref).pow(2).mean()
    assert errs["per_channel(-1)"] < errs["per_tensor"]
    slimtorch.save(q, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(q(**HELD).logits, back(**HELD).logits)
    for (n1, b1), (n2, b2) in zip(q.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(b1, b2)


def test_bad_settings_name_the_key():
    with pytest.raises(RecipeError, match="softmax_bits"):
        resolve_recipe({"name": "t", "weights": {"bits": 4},
                        "methods": [{"name": "agile_quant", "softmax_bits": 1}]})
