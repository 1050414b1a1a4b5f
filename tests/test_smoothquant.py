"""SmoothQuant: the scale formula against independently computed statistics, exact folds (norm
affine, producing Linear, explicit input scale; GQA), flatter activations, composition with
GPTQ and save/load, bad settings."""
import copy
import warnings

import pytest
import torch

import slimtorch
from slimtorch.api import run_methods
from slimtorch.errors import RecipeError
from slimtorch.quant.prepare import META_ATTR, calibrate, prepare, quantizers_off
from slimtorch.recipe import load_builtin, resolve_recipe

transformers = pytest.importorskip("transformers")

W8 = {"bits": 8, "symmetric": True, "granularity": "per_channel", "observer": "minmax"}
A8 = {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}


def tiny_llama(kv_heads=2, outliers=True, seed=0, layers=2):
    """hidden 64, 2 layers (default), 4 heads, vocabulary 128; a few norm channels ×20."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64))
    if outliers:
        with torch.no_grad():
            for layer in m.model.layers:
                layer.input_layernorm.weight[[3, 17, 40]] *= 20
                layer.post_attention_layernorm.weight[[5, 33]] *= 20
    return m.eval()


def tiny_bert():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = transformers.BertModel(transformers.BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64))
    return m.eval()


def tokens(seed, n=8, seq=16):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids}


CALIB = [tokens(k) for k in range(3)]
HELD = tokens(100)


def recipe(methods, acts=True, **extra):
    return resolve_recipe({"name": "t", "methods": methods, "weights": W8,
                           **({"activations": A8} if acts else {}), **extra})


def smoothed(model, methods, acts=True):
    """(float copy, prepared copy after the methods ran, method records): quantizers off the
    prepared copy computes the float function of the transformed weights."""
    q = copy.deepcopy(model)
    r = recipe(methods, acts)
    prepare(q, r, CALIB[0])
    calibrate(q, CALIB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = run_methods(q, r, CALIB)
    return q, records


def out(model, item, key="logits"):
    with torch.no_grad(), quantizers_off(model):
        return getattr(model(**item), key)


def input_absmax(model, fqn, batches):
    """max|x| per input channel of a layer over the batches (float model, hooks)."""
    seen = []
    h = model.get_submodule(fqn).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).abs().amax(0)))
    with torch.no_grad(), quantizers_off(model):
        for b in batches:
            model(**b)
    h.remove()
    return torch.stack(seen).amax(0)


def test_scales_follow_the_formula_and_fold_into_the_norm():
    m = tiny_llama()
    q, rec = smoothed(m, [{"name": "smoothquant", "alpha": 0.5}])
    attn = "model.layers.0.self_attn"
    x_max = input_absmax(m, f"{attn}.q_proj", CALIB)
    w_max = torch.stack([getattr(m.model.layers[0].self_attn, p).weight.abs().amax(0)
                         for p in ("q_proj", "k_proj", "v_proj")]).amax(0)
    expect = x_max.sqrt() / w_max.sqrt()
    got = m.model.layers[0].input_layernorm.weight / q.model.layers[0].input_layernorm.weight
    assert torch.allclose(got, expect, rtol=1e-4)
    assert torch.allclose(q.model.layers[0].self_attn.k_proj.weight,
                          m.model.layers[0].self_attn.k_proj.weight * expect, rtol=1e-5)
    groups = rec[0]["stats"]["groups"]
    assert groups[f"{attn}.q_proj"]["fold"] == "norm"
    assert groups[f"{attn}.q_proj"]["layers"] == [f"{attn}.{p}_proj" for p in "qkv"]
    assert groups["model.layers.0.mlp.gate_proj"]["params"] == [
        "model.layers.0.post_attention_layernorm.weight"]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smoothing_every_group_keeps_the_float_function(kv_heads):
    m = tiny_llama(kv_heads)
    q, rec = smoothed(m, [{"name": "smoothquant", "targets": "all"}])
    ref = out(m, HELD)
    assert (out(q, HELD) - ref).abs().max() <= 1e-5 * ref.abs().max() * 10
    assert rec[0]["stats"]["float_output_rel_change"] < 1e-4  # the method's own check
    groups = rec[0]["stats"]["groups"]
    o = groups["model.layers.1.self_attn.o_proj"]
    if kv_heads == 4:   # v_proj → o_proj through attention: folded into v_proj's rows
        assert o["fold"] == "linear" and o["producer"] == "model.layers.1.self_attn.v_proj"
    else:               # GQA: v_proj's channels are repeated, no exact fold
        assert o["fold"] == "explicit" and "grouped-query" in o["why_explicit"]
    assert groups["model.layers.1.mlp.down_proj"]["producer"] == "model.layers.1.mlp.up_proj"


def test_activations_are_flatter_after_smoothing():
    m = tiny_llama()
    q, _ = smoothed(m, ["smoothquant"])
    for f in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        before, after = input_absmax(m, f, CALIB), input_absmax(q, f, CALIB)
        assert after.max() / after.median() < 0.5 * (before.max() / before.median())


def test_auto_alpha_is_on_the_grid_and_no_worse_than_half():
    m = tiny_llama()
    _, rec = smoothed(m, [{"name": "smoothquant", "alpha": "auto"}])
    for g in rec[0]["stats"]["groups"].values():
        assert g["alpha"] in [round(0.3 + 0.05 * k, 2) for k in range(11)]
        assert min(g["alpha_losses"]) <= g["alpha_losses"][4]  # α = 0.5 is a candidate


def test_bert_post_ln_uses_explicit_scales_and_round_trips(tmp_path):
    m = tiny_bert()
    q, rec = smoothed(m, [{"name": "smoothquant", "targets": "all"}])
    ref = out(m, HELD, "last_hidden_state")
    assert (out(q, HELD, "last_hidden_state") - ref).abs().max() <= 1e-4 * ref.abs().max()
    folds = {g["fold"] for g in rec[0]["stats"]["groups"].values()}
    assert "explicit" in folds  # post-LN outputs also feed the residual; GELU outputs
    r = recipe([{"name": "smoothquant", "targets": "all"}, "gptq"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = slimtorch.quantize(m, r, CALIB, self_check=False)
    slimtorch.save(qm, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(qm(**HELD).last_hidden_state, back(**HELD).last_hidden_state)
    assert any(getattr(mod, "input_scale", None) is not None for mod in back.modules())


def test_smoothquant_gptq_recipe_runs_beats_rtn_and_round_trips(tmp_path):
    m = tiny_llama()
    ref = out(m, HELD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = slimtorch.quantize(m, recipe(["rtn"]), CALIB, self_check=False)
        sq = slimtorch.quantize(m, load_builtin("w8a8-smoothquant-gptq"), CALIB)
    with torch.no_grad():
        e_rtn = (rtn(**HELD).logits - ref).pow(2).mean()
        e_sq = (sq(**HELD).logits - ref).pow(2).mean()
    assert e_sq < e_rtn
    assert [r["name"] for r in getattr(sq, META_ATTR)["methods"]] == ["smoothquant", "gptq"]
    slimtorch.save(sq, tmp_path / "sq")
    back = slimtorch.load(tmp_path / "sq", m)
    with torch.no_grad():
        assert torch.equal(sq(**HELD).logits, back(**HELD).logits)


def test_bad_alpha_names_the_key():
    with pytest.raises(RecipeError, match="alpha"):
        recipe([{"name": "smoothquant", "alpha": 1.5}])
    with pytest.raises(RecipeError, match="alpha"):
        recipe([{"name": "smoothquant", "alpha": "best"}])
