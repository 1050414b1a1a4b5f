"""Residual-stream rotation (QuaRot): Hadamard constructions (H·Hᵀ = n·I at SmolLM2's sizes),
the fused rotation keeps the float function (MHA and GQA, tied lm_head), norm scales folded,
flatter activations, save/load bit-exact, recipes, and clear errors where it is not exact."""
import copy
import warnings

import pytest
import torch

import slimtorch
from slimtorch.algorithms.hadamard import hadamard, hadamard_factors, paley, rotation
from slimtorch.errors import RotationError
from slimtorch.api import run_methods
from slimtorch.quant.prepare import META_ATTR, calibrate, prepare, quantizers_off
from slimtorch.recipe import load_builtin

from test_smoothquant import CALIB, HELD, input_absmax, out, recipe, smoothed, tiny_bert, \
    tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 192, 576, 1536])
def test_hadamard_is_hadamard(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_smollm2_sizes_factor_into_sylvester_and_paley():
    assert hadamard_factors(576) == (16, 36) and hadamard_factors(1536) == (128, 12)
    assert hadamard_factors(192) == (16, 12)
    assert paley(12) is not None and paley(36) is not None  # Paley I (q=11), II (q=17)
    q, info = rotation(576, seed=3)
    assert info["kind"] == "randomized_hadamard" and info["factors"] == [16, 36]
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 576 ** -0.5))  # ±1/√n entries
    q2, _ = rotation(576, seed=4)
    assert not torch.equal(q, q2)  # the signs are the seed's


def test_no_construction_falls_back_to_a_random_orthogonal_matrix():
    assert hadamard(100) is None
    q, info = rotation(100, seed=0)
    assert info["kind"] == "random_orthogonal" and "100" in info["why"]
    assert torch.allclose(q @ q.T, torch.eye(100, dtype=torch.float64), atol=1e-12)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rotation_keeps_the_float_function_and_folds_the_norms(kv_heads):
    m = tiny_llama(kv_heads)
    q, rec = smoothed(m, ["rotate"], acts=False)
    assert rel(out(q, HELD), out(m, HELD)) < 1e-4
    st = rec[0]["stats"]
    assert st["float_output_rel_change"] < 1e-4
    assert st["writers"] == [f"model.layers.{i}.{p}" for i in range(2)
                             for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert st["embeddings"] == ["model.embed_tokens"]
    readers = [g["layers"] for g in st["readers"]]
    assert readers[-1] == ["lm_head"] and len(readers) == 5
    for name, p in q.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    # W_q ← W_q·diag(γ)·Q and E ← E·Q with one Q
    qm = torch.linalg.lstsq(m.model.embed_tokens.weight.double(),
                            q.model.embed_tokens.weight.double()).solution
    assert torch.allclose(qm @ qm.T, torch.eye(64, dtype=torch.float64), atol=1e-4)
    wq = m.model.layers[0].self_attn.q_proj.weight.double()
    gamma = m.model.layers[0].input_layernorm.weight.double()
    assert torch.allclose(q.model.layers[0].self_attn.q_proj.weight.double(),
                          wq * gamma @ qm, atol=1e-4)


def test_rotated_inputs_have_no_outlier_channels():
    m = tiny_llama()
    q, _ = smoothed(m, ["rotate"], acts=False)
    for f in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        before, after = input_absmax(m, f, CALIB), input_absmax(q, f, CALIB)
        assert after.max() / after.median() < 0.3 * (before.max() / before.median())


def tied_llama():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True))
    with torch.no_grad():
        m.model.norm.weight.uniform_(0.5, 2.0)  # folding γ into lm_head breaks the tie
    assert m.lm_head.weight is m.model.embed_tokens.weight
    return m.eval()


def test_tied_lm_head_is_untied_rotated_exactly_and_round_trips(tmp_path):
    m = tied_llama()
    q, _ = smoothed(m, ["rotate"], acts=False)
    assert rel(out(q, HELD), out(m, HELD)) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rq = slimtorch.quantize(m, load_builtin("w4a8-rotate-gptq"), CALIB[:1],
                                self_check=False)
    assert rq.lm_head.weight is not rq.model.embed_tokens.weight
    assert getattr(rq, META_ATTR)["untied"] == ["lm_head.weight"]
    assert m.lm_head.weight is m.model.embed_tokens.weight  # the input is untouched
    slimtorch.save(rq, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(rq(**HELD).logits, back(**HELD).logits)
    for k, v in rq.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_rotate_gptq_recipes_compose_and_beat_gptq_without_rotation():
    m = tiny_llama()
    ref = out(m, HELD)
    errs = {}
    for name, methods in (("plain", [{"name": "gptq", "act_order": True}]),
                          ("rotated", None)):
        r = load_builtin("w4a8-rotate-gptq")
        if methods is not None:
            r = type(r).model_validate({**r.to_dict(), "methods": methods})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = slimtorch.quantize(m, r, CALIB[:1], self_check=False)
        with torch.no_grad():
            errs[name] = float((qm(**HELD).logits - ref).pow(2).mean())
        names = [x["name"] for x in getattr(qm, META_ATTR)["methods"]]
        assert names == (["gptq"] if methods else ["rotate", "gptq"])
    assert errs["rotated"] < errs["plain"]
    assert load_builtin("w4-rotate-gptq-g64").activations is None


def test_layernorm_model_is_refused_with_the_reason():
    with pytest.raises(RotationError, match="subtracts the mean"):
        smoothed(tiny_bert(), ["rotate"], acts=False)


def test_rotate_after_an_explicit_input_scale_is_refused():
    m = tiny_llama(kv_heads=2)  # GQA: o_proj gets an explicit input scale from smoothquant
    with pytest.raises(RotationError, match="rotate. first"):
        smoothed(m, [{"name": "smoothquant", "targets": "all"}, "rotate"])


def test_kron_rotate_is_multiplication_by_the_kronecker_product():
    from slimtorch.algorithms.hadamard import kron_factors
    from slimtorch.quant.modules import kron_rotate
    for n in (192, 1536, 64):
        a, b = kron_factors(n)
        assert torch.allclose(torch.kron(a, b), hadamard(n) / n ** 0.5)
        x = torch.randn(3, 5, n, dtype=torch.float64)
        assert torch.allclose(kron_rotate(x, a, b), x @ torch.kron(a, b), atol=1e-12)


def online_model(m, rec_recipe=None, calib=CALIB[:1]):
    r = rec_recipe or recipe([{"name": "rotate", "online": True}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimtorch.quantize(m, r, calib, self_check=False)


def test_online_hadamard_before_down_proj_is_exact_and_round_trips(tmp_path):
    m = tiny_llama(kv_heads=2)
    q, rec = smoothed(m, [{"name": "rotate", "online": True}])
    assert rel(out(q, HELD), out(m, HELD)) < 1e-4
    online = rec[0]["stats"]["online"]["layers"]
    assert online == {f"model.layers.{i}.mlp.down_proj": [16, 12] for i in range(2)}
    down = q.model.layers[0].mlp.down_proj
    assert down.input_rotation is not None and q.model.layers[0].self_attn.o_proj.input_rot_a \
        is None
    # the layer's input quantizer sees x·H: no outlier channel left at the 8-bit grid
    qm = online_model(m)
    slimtorch.save(qm, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", m)
    with torch.no_grad():
        assert torch.equal(qm(**HELD).logits, back(**HELD).logits)
    assert torch.equal(back.model.layers[1].mlp.down_proj.input_rot_b,
                       qm.model.layers[1].mlp.down_proj.input_rot_b)


def test_integer_kernels_apply_the_input_rotation():
    from slimtorch.intops.linear import IntLinear
    from slimtorch.intops.packed import PackedLinear
    m = tiny_llama(kv_heads=2, layers=1)
    qm = online_model(m, recipe([{"name": "rotate", "online": True}], acts=False)
                      .model_copy(update={"activations": None}))
    down = qm.model.layers[0].mlp.down_proj
    x = torch.randn(4, 192)
    with torch.no_grad():
        ref = down(x)
        assert torch.allclose(PackedLinear(down)(x), ref, rtol=0.05, atol=0.05 * ref.abs().max())
    w8a8 = online_model(m, load_builtin("w8a8-dynamic").model_copy(
        update={"methods": recipe([{"name": "rotate", "online": True}]).methods}))
    down = w8a8.model.layers[0].mlp.down_proj
    with torch.no_grad():
        ref = down(x)
        assert torch.allclose(IntLinear(down)(x), ref, atol=1e-4 * ref.abs().max())


def test_input_rotation_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimtorch.algorithms.hadamard import kron_factors
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 192), torch.nn.ReLU(),
                              torch.nn.Linear(192, 10)).eval()
    x = torch.randn(64, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = slimtorch.quantize(net, recipe(["rtn"]), x, self_check=False)
    before = qm(x)
    qm[2].set_input_rotation(*kron_factors(192))
    assert not torch.allclose(qm(x), before)  # the rotation is live
    r = slimtorch.export_onnx(qm, tmp_path / "m.onnx", x)
    assert r.ort_error is None and r.agreement["max_rel_diff"] < 1e-2


class NormDecoder(torch.nn.Module):
    """Not a transformers model: torch RMSNorm (F.rms_norm), biased Linears, GELU MLP."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.emb = nn.Embedding(50, 48)
        self.norm1, self.norm2 = nn.RMSNorm(48), nn.RMSNorm(48)
        self.fc1, self.fc2 = nn.Linear(48, 96), nn.Linear(96, 48)
        self.fc3, self.fc4 = nn.Linear(48, 96), nn.Linear(96, 48)
        self.head = nn.Linear(48, 50)
        with torch.no_grad():
            for n in (self.norm1, self.norm2):
                n.weight.uniform_(0.2, 3.0)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm1(x))))
        x = x + self.fc4(torch.relu(self.fc3(self.norm2(x))))
        return self.head(x)  # a raw reader of the stream (no final norm)


def test_structure_comes_from_the_graph_not_from_hf_classes():
    torch.manual_seed(0)
    m = NormDecoder().eval()
    ids = [torch.randint(0, 50, (4, 12)) for _ in range(2)]
    q = copy.deepcopy(m)
    r = recipe(["rotate"], acts=False)
    prepare(q, r, ids[0])
    calibrate(q, ids)
    st = run_methods(q, r, ids)[0]["stats"]
    assert st["rotation"]["factors"] == [4, 12]  # 48 = 4·12: Sylvester ⊗ Paley I
    assert st["writers"] == ["fc2", "fc4"] and st["raw_readers"] == ["head"]
    assert [g["layers"] for g in st["readers"]] == [["fc1"], ["fc3"]]
    with torch.no_grad(), quantizers_off(q):
        assert rel(q(ids[1]), m(ids[1])) < 1e-4
