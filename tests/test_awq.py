"""AWQ: scaling alone keeps the float function (including GQA), α is on the grid, W4 g64 error
below RTN on a tiny Llama with salient channels, clipping never raises a layer's error,
composition with GPTQ and save/load, per-group sizes that do not divide."""
import warnings

import pytest
import torch

import slimtorch
from slimtorch.algorithms.awq import awq_scales, clip_weight
from slimtorch.algorithms.channel_scales import fake_weight
from slimtorch.errors import RecipeError, SlimtorchError
from slimtorch.quant.prepare import META_ATTR
from slimtorch.quant.spec import QuantSpec
from slimtorch.recipe import load_builtin, resolve_recipe

from test_smoothquant import CALIB, HELD, out, smoothed, tiny_llama

W4 = {"bits": 4, "symmetric": True, "granularity": "per_group(64)", "observer": "minmax"}


def w4(methods, **w):
    return resolve_recipe({"name": "t", "methods": methods, "weights": {**W4, **w},
                           "quantize_embeddings": False, "last_layer": {"weights": None}})


def quantized(model, methods, **w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimtorch.quantize(model, w4(methods, **w), CALIB, self_check=False)


def held_error(q, model):
    with torch.no_grad():
        return float((q(**HELD).logits - out(model, HELD)).pow(2).mean())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_scaling_alone_keeps_the_float_function(kv_heads, monkeypatch):
    import test_smoothquant as sq
    monkeypatch.setattr(sq, "recipe", lambda methods, acts=True: w4(methods))
    m = tiny_llama(kv_heads)
    q, rec = smoothed(m, [{"name": "awq", "clip": False}])
    ref = out(m, HELD)
    assert (out(q, HELD) - ref).abs().max() <= 1e-5 * ref.abs().max() * 10
    assert rec[0]["stats"]["float_output_rel_change"] < 1e-4
    groups = rec[0]["stats"]["groups"]
    assert {g["fold"] for g in groups.values()} == (
        {"norm", "linear"} if kv_heads == 4 else {"norm", "linear", "explicit"})
    for g in groups.values():
        assert g["alpha"] in [k / 20 for k in range(20)] and len(g["losses"]) == 20
        assert min(g["losses"]) <= g["losses"][0]  # α = 0 (no scaling) is a candidate


def test_scales_are_normalised_mean_abs_powers():
    a = torch.tensor([0.5, 2.0, 8.0])
    s = awq_scales(a, 0.5)
    assert torch.allclose(s, a.sqrt() / (a.sqrt().max() * a.sqrt().min()).sqrt())
    assert torch.allclose(awq_scales(a, 0.0), torch.ones(3))


def test_awq_beats_rtn_on_salient_channels_and_gptq_composes(tmp_path):
    m = tiny_llama()
    e_rtn = held_error(quantized(m, ["rtn"]), m)
    e_awq = held_error(quantized(m, ["awq"]), m)
    both = quantized(m, ["awq", "gptq"])
    assert e_awq < 0.7 * e_rtn
    assert held_error(both, m) < e_awq
    slimtorch.save(both, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(both(**HELD).logits, back(**HELD).logits)
    assert [r["name"] for r in getattr(back, META_ATTR)["methods"]] == ["awq", "gptq"]


def test_gqa_explicit_scale_round_trips(tmp_path):
    m = tiny_llama(kv_heads=2)
    q = quantized(m, ["awq"])
    groups = getattr(q, META_ATTR)["methods"][0]["stats"]["groups"]
    assert groups["model.layers.0.self_attn.o_proj"]["fold"] == "explicit"
    assert q.model.layers[0].self_attn.o_proj.input_scale is not None
    slimtorch.save(q, tmp_path / "g")
    back = slimtorch.load(tmp_path / "g", m)
    with torch.no_grad():
        assert torch.equal(q(**HELD).logits, back(**HELD).logits)
    skip = quantized(m, [{"name": "awq", "unfoldable": "skip"}])
    assert skip.model.layers[0].self_attn.o_proj.input_scale is None


def test_clipping_never_increases_the_layer_error():
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec(bits=3, symmetric=True, granularity="per_group(16)", observer="minmax")
    w = torch.randn(24, 64, generator=g)
    w[:, 5] *= 6                                  # outlier weights: clipping pays
    x = torch.randn(256, 64, generator=g)
    clipped, st = clip_weight(w, x, spec)
    y = x @ w.T
    e_none = (x @ fake_weight(spec, w).T - y).pow(2).mean(0)
    e_clip = (x @ fake_weight(spec, clipped).T - y).pow(2).mean(0)
    assert (e_clip <= e_none + 1e-7).all() and e_clip.sum() < e_none.sum()
    assert st["error_after"] <= st["error_before"]
    m = tiny_llama()
    stats = getattr(quantized(m, ["awq"]), META_ATTR)["methods"][0]["stats"]
    for grp in stats["groups"].values():
        for c in grp["clip"].values():
            assert c["error_after"] <= c["error_before"]


def test_shipped_weight_only_recipes():
    for name in ("w4-rtn-g64", "w4-gptq-g64", "w4-awq", "w4-awq-gptq"):
        r = load_builtin(name)
        assert r.activations is None and str(r.weights.granularity) == "per_group(64)"
        assert r.weights.symmetric and r.weights.bits == 4
        assert not r.quantize_embeddings and r.last_layer.weights is None
    assert load_builtin("w4-awq-gptq").method_names == ["awq", "gptq"]


def test_group_size_that_does_not_divide_names_the_fix():
    m = tiny_llama()
    with pytest.raises(RecipeError, match=r"per_group\(48\) does not divide the 64 input "
                                          r"features.*per_group\(64\)") as e:
        quantized(m, ["awq"], granularity="per_group(48)")
    assert isinstance(e.value, SlimtorchError)
