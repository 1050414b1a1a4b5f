"""Dynamic (run-time) activation ranges: per-token W8A8, as SmoothQuant runs LLMs."""
import copy
import warnings

import pytest
import torch

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.intops import lower_to_int8, lowering_summary
from slimtorch.quant.prepare import activation_quantizers
from slimtorch.quant.quantizer import Mode, Quantizer
from slimtorch.quant.spec import QuantSpec
from slimtorch.recipe import load_builtin, resolve_recipe

from test_smoothquant import CALIB, HELD, out, tiny_llama, tokens


def per_token(**kw) -> Quantizer:
    q = Quantizer(QuantSpec(bits=8, symmetric=True, granularity="per_token", **kw))
    q.mode = Mode.OBSERVE
    q(torch.randn(3, 8))
    q.finish_observe()
    return q


def test_per_token_scale_is_each_tokens_absmax_over_127():
    q = per_token()
    x = torch.randn(2, 5, 16)
    x[0, 1] *= 100  # one outlier token
    s, z = q.dynamic_params(x)
    assert s.shape == (2, 5, 1) and torch.equal(z, torch.zeros_like(z))
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 127)
    y = q(x)
    err = (y - x).abs().amax(-1)  # at most half a step of the token's own grid
    assert bool((err <= s[..., 0] / 2 + 1e-6).all())
    # the outlier token does not coarsen the other tokens' grids (a per-tensor range would)
    x2 = x.clone()
    x2[0, 1] /= 100
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = False
    assert torch.equal(q(x)[keep], q(x2)[keep])


def test_spec_rules_for_dynamic_ranges():
    assert QuantSpec(bits=8, granularity="per_token").dynamic
    with pytest.raises(ValueError, match="observer"):
        QuantSpec(bits=8, granularity="per_token", observer="mse")
    with pytest.raises(ValueError, match="dynamic: false"):
        QuantSpec(bits=8, granularity="per_token", dynamic=False)
    with pytest.raises(ValueError, match="per_token or per_tensor"):
        QuantSpec(bits=4, granularity="per_group(8)", dynamic=True)
    base = load_builtin("w8a8-dynamic").to_dict()
    base["weights"] = {"bits": 8, "granularity": "per_token"}
    with pytest.raises(RecipeError, match="activations only"):
        resolve_recipe(base)


def quantized(recipe, m=None, calib=CALIB):
    m = tiny_llama() if m is None else m
    r = load_builtin(recipe) if isinstance(recipe, str) else resolve_recipe(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m, slimtorch.quantize(m, r, calib, self_check=False)


def with_start_token(batch: dict) -> dict:
    ids = batch["input_ids"].clone()
    ids[:, 0] = 5
    return {"input_ids": ids}


def test_per_token_beats_static_per_tensor_on_a_massive_activation_token():
    """A start token with massive activations (as real LLMs have) ruins one calibrated
    per-tensor range for every other token; per-token ranges isolate it."""
    m = tiny_llama()
    with torch.no_grad():
        m.model.embed_tokens.weight[5, :8] *= 300
    calib, held = [with_start_token(b) for b in CALIB], with_start_token(HELD)
    static = load_builtin("w8a8-dynamic").to_dict()
    static["activations"] = {"bits": 8, "symmetric": True, "granularity": "per_tensor",
                             "observer": "minmax"}
    _, dyn = quantized("w8a8-dynamic", m, calib)
    _, st = quantized(static, m, calib)
    ref = out(m, held)
    with torch.no_grad():
        e_dyn = (dyn(**held).logits - ref).pow(2).mean()
        e_static = (st(**held).logits - ref).pow(2).mean()
    assert e_dyn < e_static / 4
    qs = activation_quantizers(dyn)
    assert qs and all(q.spec.dynamic and q.mode is Mode.QUANT for q in qs)


def test_dynamic_model_round_trips_and_lowers_to_int8(tmp_path):
    m, q = quantized("w8a8-smoothquant")
    slimtorch.save(q, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        y = q(**HELD).logits
        assert torch.equal(y, back(**HELD).logits)
    lowered = lower_to_int8(copy.deepcopy(back))
    summary = lowering_summary(lowered)
    n_linear = sum(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    assert len(summary["int8"]) == n_linear  # every Linear, lm_head included
    assert [f["layer"] for f in summary["fake_quant"]] == ["model.embed_tokens"]
    with torch.no_grad():
        y_int = lowered(**HELD).logits
    # the same codes and scales; float summation order differs, so a rare code flips one step:
    # far below the quantization error itself
    e_q = (y - out(m, HELD)).pow(2).mean()
    assert (y_int - y).pow(2).mean() < 0.01 * e_q
    assert any(mod.in_scale is not None for mod in lowered.modules()
               if hasattr(mod, "in_scale"))  # o_proj's explicit SmoothQuant scale (GQA)


def test_a_tied_lm_head_is_a_quantized_layer_and_round_trips(tmp_path):
    """The LM head reads the embedding's matrix (tie_word_embeddings): it is still the model's
    last layer — quantized in W8A8, kept float by the weight-only recipes' last_layer."""
    import transformers
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    _, q = quantized("w8a8-dynamic", m)
    assert q.lm_head.weight_int.shape == (128, 64)
    slimtorch.save(q, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(q(**HELD).logits, back(**HELD).logits)
    # embedding and head quantize the one matrix on the same per-row grid: its codes are
    # written once (the second name an alias)
    assert torch.equal(q.lm_head.weight_int, q.model.embed_tokens.weight_int)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({"lm_head.weight_int.packed", "model.embed_tokens.weight_int.packed"} & keys) == 1
    _, w4 = quantized("w4-rtn-g64", m)
    assert not hasattr(w4.lm_head, "weight_int")  # last_layer: weights null is the head
    assert hasattr(w4.model.layers[1].mlp.down_proj, "weight_int")


@pytest.mark.parametrize("gran", ["per_tensor", "per_token"])
def test_int_linear_dynamic_input_matches_fake_quant(gran):
    """IntLinear with a dynamic symmetric input: the scale is taken over the whole input
    (per_tensor, even when the rows are processed in chunks) or per row (per_token), as the
    fake quantizer takes it."""
    from slimtorch.intops import IntLinear
    from slimtorch.intops import linear as linear_mod
    from slimtorch.quant.modules import QuantLinear
    torch.manual_seed(0)
    layer = QuantLinear.from_module(
        torch.nn.Linear(64, 32), QuantSpec(bits=8, symmetric=True, granularity="per_channel",
                                           observer="minmax"),
        QuantSpec(bits=8, symmetric=True, granularity=gran, dynamic=True))
    layer.calibrate_weight()
    layer.freeze()
    layer.input_quantizer.mode = Mode.QUANT
    x = torch.randn(300, 64)
    x[7] *= 50  # one loud row: per tensor it sets everyone's scale, per token only its own
    old = linear_mod.CHUNK_ELEMENTS
    linear_mod.CHUNK_ELEMENTS = 64 * 64  # several row chunks
    try:
        with torch.no_grad():
            y_fq, y_int = layer(x), IntLinear(layer)(x)
    finally:
        linear_mod.CHUNK_ELEMENTS = old
    assert (y_int - y_fq).abs().max() <= 1e-4 * y_fq.abs().max()
