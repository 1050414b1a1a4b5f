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


# ------------------------------------------------------------------ token pruning
from slimtorch.algorithms import agile_prune  # noqa: E402
from slimtorch.algorithms.agile_prune import (install_pruning, keep_counts, layer_ratio,  # noqa: E402
                                              pruner_of, pruning_plan, remove_pruning)


def pruned_recipe(beta, start="mid"):
    r = load_builtin("w4a8-agile-quant").to_dict()
    r["methods"][0].update(prune_ratio=beta, prune_from=start)
    return resolve_recipe(r)


def fake_scores(monkeypatch, score_of_position):
    """Make the pruning score of query i equal score_of_position(i) (probs[..., i, 0])."""
    def probs(q, k, *args):
        t = q.shape[-2]
        p = torch.zeros(*q.shape[:-1], k.shape[-2])
        p[..., 0] = torch.tensor([float(score_of_position(i)) for i in range(t)])
        return p
    monkeypatch.setattr(agile_prune, "sdpa_probs", probs)


def test_layer_ratio_and_counts_reach_beta():
    for beta, m in ((0.5, 2), (0.2, 15), (0.9, 3)):
        g = layer_ratio(beta, m)
        assert abs((1 - g) ** m - (1 - beta)) < 1e-12
    assert abs(layer_ratio(0.5, 2) - (1 - 0.5 ** 0.5)) < 1e-12
    assert keep_counts(32, 0.5, 2) == [23, 16]           # 32·√0.5 = 22.6, 32·0.5
    assert keep_counts(512, 0.1, 15)[-1] == round(512 * 0.9)
    assert keep_counts(512, 0.0, 15) == [512] * 15
    assert keep_counts(8, 0.99, 3) == [2, 1, 1]          # at least one token (the start)


def test_scores_are_attention_to_the_start_token_by_hand():
    m = tiny_llama(layers=4)
    q = quantized(m, pruned_recipe(0.25))
    plan = getattr(q, META_ATTR)["token_pruning"]
    assert plan["prune_from"] == 2 and plan["blocks"] == [f"model.layers.{i}" for i in range(4)]
    fm = tiny_llama(layers=4)  # float, scored by the same hooks
    from slimtorch.quant.prepare import META_ATTR as MA
    setattr(fm, MA, {"graph": getattr(q, MA)["graph"]})
    p = install_pruning(fm, plan)
    with torch.no_grad():
        fm(**HELD)
    eager = tiny_llama(layers=4)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        att = eager(**HELD, output_attentions=True).attentions[2]  # [B, H, T, T], full length
    want = att[..., 0].sum(1)                                       # Σ_h A[h, i, 0]
    assert torch.allclose(p.scores[2], want, atol=1e-5)
    n = keep_counts(24, 0.25, 2)[0]
    top = want.masked_fill(torch.arange(24) == 0, float("inf")).topk(n, 1).indices.sort(1).values
    assert p.scores[3].shape == (2, n)
    assert p.kept.sum(1).tolist() == [keep_counts(24, 0.25, 2)[1]] * 2
    assert p.kept[torch.arange(2)[:, None], top].sum() == p.kept.sum()  # layer-3 survivors ⊂ top


def test_start_token_is_never_dropped(monkeypatch):
    m = tiny_llama()
    q = quantized(m, pruned_recipe(0.5, 0), self_check=False)
    fake_scores(monkeypatch, lambda i: -1.0 if i == 0 else i)  # the start scores lowest
    with torch.no_grad():
        q(**HELD)
    kept = pruner_of(q).kept
    assert kept[:, 0].all() and kept.sum(1).tolist() == [12, 12]
    assert kept[:, -11:].all()  # the rest: the highest (latest) scores


def test_beta_zero_equals_unpruned_and_slicing_matches_a_hand_run(monkeypatch):
    m = tiny_llama()
    q = quantized(m, self_check=False)
    with torch.no_grad():
        ref = q(**HELD).logits
    plan = pruning_plan(q, 0.0, 0)
    p = install_pruning(q, plan)
    with torch.no_grad():
        assert torch.equal(q(**HELD).logits, ref)
    assert p.kept.all()
    # float model, layer 0 drops tokens {3, 5, 9, ...}: layer 1 must see the survivors at
    # their own positions (RoPE cos/sin and the causal mask sliced alike)
    fm = tiny_llama()
    setattr(fm, META_ATTR, {"graph": getattr(q, META_ATTR)["graph"]})
    install_pruning(fm, {**pruning_plan(fm, 0.25, 0)})
    drop = (3, 9, 14)  # layer 0 keeps round(24·√0.75) = 21: exactly these three go
    fake_scores(monkeypatch, lambda i: 0.01 * i if i in drop else 1.0 + 0.01 * i)
    ids = HELD["input_ids"]
    with torch.no_grad():
        got = fm(input_ids=ids).logits
        kept = pruner_of(fm).kept
        remove_pruning(fm)
        inner, pos = fm.model, torch.arange(24)[None]
        x = inner.embed_tokens(ids)
        h = inner.layers[0](x, attention_mask=None, position_ids=pos,
                            position_embeddings=inner.rotary_emb(x, pos))
        s = torch.tensor([i for i in range(24) if i not in drop])
        h = h[:, s]
        h = inner.layers[1](h, attention_mask=None, position_ids=s[None],
                            position_embeddings=inner.rotary_emb(h, s[None]))
        want = fm.lm_head(inner.norm(h))                  # [B, 21, V] at positions s
    assert kept.sum(1).tolist() == [18, 18] and not kept[:, list(drop)].any()
    for b in range(2):
        k = kept[b].nonzero().flatten()
        rows = [s.tolist().index(i) for i in k.tolist()]
        assert torch.allclose(got[b, k], want[b, rows], atol=1e-5)


def test_pruned_artifact_round_trips(tmp_path):
    m = tiny_llama(layers=4)
    q = quantized(m, pruned_recipe(0.3))
    slimtorch.save(q, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(q(**HELD).logits, back(**HELD).logits)
    assert torch.equal(pruner_of(q).kept, pruner_of(back).kept)
    assert not pruner_of(back).kept.all()


def test_bad_prune_settings():
    with pytest.raises(RecipeError, match="prune_ratio"):
        pruned_recipe(1.0)
    with pytest.raises(RecipeError, match="prune_from"):
        quantized(tiny_llama(), pruned_recipe(0.2, 7))


def test_causal_lm_scores_a_pruned_model_on_surviving_tokens_paired():
    from slimtorch.eval.tasks import CausalLM
    m = tiny_llama(layers=4)
    q = quantized(m, pruned_recipe(0.3), self_check=False)
    task = CausalLM()
    task.inputs = lambda n=None: [HELD]
    fp, out = task.outputs(m), task.outputs(q)
    assert set(out) == {"nll", "pred", "kept", "nll_unpruned", "pred_unpruned"}
    keep = out["kept"]
    assert keep.shape == fp["nll"].shape and 0 < keep.sum() < keep.numel()
    sc = task.score(out, fp)
    assert sc["ppl"] == round(out["nll"][keep].mean().exp().item(), 4)
    assert sc["fp_ppl_same_tokens"] == round(fp["nll"][keep].mean().exp().item(), 4)
    assert sc["unpruned_ppl_same_tokens"] == round(out["nll_unpruned"][keep].mean().exp().item(), 4)
    assert sc["unpruned_ppl"] == round(out["nll_unpruned"].mean().exp().item(), 4)
    per_window = ((out["nll"] - fp["nll"]) * keep).sum(1) / keep.sum(1)
    assert abs(sc["nll_diff"] - per_window.mean().item()) < 1e-5
    # the unpruned pass is the same quantized model without its pruning
    remove_pruning(q)
    with torch.no_grad():
        unp = task.outputs(q)
    assert torch.equal(unp["nll"], out["nll_unpruned"]) and "kept" not in unp
