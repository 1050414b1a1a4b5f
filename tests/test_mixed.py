"""Mixed precision: the allocation DP is optimal and keeps the budget; the coding length
formula; sensitivity on a small CNN; the written recipe runs."""
import itertools
import math

import pytest
import torch
from torch import nn

from slimtorch.errors import SlimtorchError
from slimtorch.eval.sensitivity import layer_sensitivity, spearman
from slimtorch.quant.allocate import (allocate, allocate_from_sensitivity, budget_bits,
                                      coding_length, mixed_recipe)
from slimtorch.recipe import load_recipe_text, resolve_recipe


def _brute(costs, values, budget):
    best = None
    for pick in itertools.product(*[sorted(c) for c in costs]):
        cost = sum(c[b] for c, b in zip(costs, pick))
        if cost <= budget:
            val = sum(v[b] for v, b in zip(values, pick))
            if best is None or val < best[0] - 1e-12:
                best = (val, list(pick))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force_and_keeps_budget(seed):
    g = torch.Generator().manual_seed(seed)
    params = [int(x) for x in torch.randint(1, 40, (5,), generator=g)]
    bits = [2, 3, 4, 8]
    costs = [{b: n * b for b in bits} for n in params]
    values = [{b: float(torch.rand((), generator=g)) * 2.0 ** (-b) * n for b in bits}
              for n in params]
    for avg in (2.5, 3.0, 4.0, 5.5):
        budget = budget_bits(params, avg_bits=avg)
        res = allocate(costs, values, budget)
        val, pick = _brute(costs, values, budget)
        assert res["exact"] and res["cost"] <= budget
        assert res["value"] == pytest.approx(val, abs=1e-12)
        assert res["cost"] == sum(c[b] for c, b in zip(costs, res["bits"]))


def test_dp_coarse_units_still_keep_budget():
    params = [997, 1009, 1013, 1019]  # primes: gcd 1, so many states
    costs = [{b: n * b for b in (2, 4, 8)} for n in params]
    values = [{2: 1.0, 4: 0.1, 8: 0.0} for _ in params]
    budget = budget_bits(params, avg_bits=4)
    res = allocate(costs, values, budget, max_states=100)
    assert not res["exact"] and res["cost"] <= budget


def test_budget_errors():
    with pytest.raises(SlimtorchError, match="one budget"):
        budget_bits([10], avg_bits=4, size_bytes=10)
    with pytest.raises(SlimtorchError, match="below the smallest"):
        allocate([{2: 20, 4: 40}], [{2: 1.0, 4: 0.0}], 10)


def test_coding_length_formula():
    # W = diag(1, 2) (m = n = 2), ε = 1: det(I + WWᵀ) = 2·5, L = (2+2)/2 · log2 10
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert coding_length(w, 1.0) == pytest.approx(2 * math.log2(10))
    # a 3×5 matrix against the formula written out with numpy-free torch ops
    w = torch.arange(15.0, dtype=torch.float64).reshape(3, 5) / 7 - 1
    m, n, eps = 3, 5, 0.3
    ref = (m + n) / 2 * math.log2(torch.det(torch.eye(m, dtype=w.dtype) + n / (eps ** 2 * m) * w @ w.T))
    assert coding_length(w, eps) == pytest.approx(ref, rel=1e-9)
    # a conv weight [out, in, k, k] is read as [out, in·k·k]; wide and tall give the same det
    wc = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    assert coding_length(wc, 0.5) == pytest.approx(coding_length(wc.reshape(4, 18), 0.5))
    assert coding_length(torch.randn(20, 3), 0.5) > 0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_sensitivity_allocation_recipe_roundtrip():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(96, 1, 8, 8)
    sens = layer_sensitivity(model, x[:48], x[48:], recipe="w4a8", bits=(2, 4, 8), probes=2,
                             hessian_samples=32)
    names = [l["fqn"] for l in sens["layers"]]
    assert names == ["c1", "c2", "fc"]
    for l in sens["layers"]:
        assert l["kl"][2] > l["kl"][8]  # fewer bits, more damage
        assert l["sqnr"][2] > l["sqnr"][4] > l["sqnr"][8] > 0
        assert l["hessian_trace"] >= 0 and l["hawq"][2] > l["hawq"][8]
    assert sens["baseline"]["kl"] >= 0
    assert -1 <= sens["spearman"]["sqnr"]["pooled"] <= 1
    alloc = allocate_from_sensitivity(sens, avg_bits=4, criterion="kl")
    assert alloc["cost"] <= alloc["budget"] and set(alloc["layers"]) == set(names)
    recipe = mixed_recipe(resolve_recipe("w4a8"), alloc)
    again = load_recipe_text(recipe.to_yaml())
    assert again == recipe
    import slimtorch
    q = slimtorch.quantize(model, again, x[:48], self_check=False)
    for fqn, b in alloc["layers"].items():
        assert q.get_submodule(fqn).weight_quantizer.spec.bits == b
    with pytest.raises(SlimtorchError, match="not measured"):
        allocate_from_sensitivity(sens, avg_bits=4, bits=[3, 4])


def test_recipe_mixed_option_resolves_coding_length_bits():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(48, 1, 8, 8)
    recipe = resolve_recipe("w4avg-a8-attention-round-cl").to_dict()
    recipe["methods"] = ["rtn"]
    recipe["mixed"]["avg_bits"] = 5
    import slimtorch
    q = slimtorch.quantize(model, recipe, x, self_check=False)
    meta = q._slimtorch_meta
    layers = meta["mixed"]["layers"]
    assert set(layers) == {"c1", "c2", "fc"} and meta["recipe"]["mixed"] is None
    n = {f: q.get_submodule(f).weight.numel() for f in layers}
    assert sum(n[f] * b for f, b in layers.items()) <= 5 * sum(n.values())
    for f, b in layers.items():
        assert q.get_submodule(f).weight_quantizer.spec.bits == b
    # the allocation is the DP's on s(b) = L(W)·2^(−2b)
    costs = [{b: n[f] * b for b in (2, 3, 4, 6, 8)} for f in layers]
    vals = []
    for f in layers:
        w = model.get_submodule(f).weight.detach()
        cl = coding_length(w, 0.5 * w.square().mean().sqrt().item())
        vals.append({b: cl * 2.0 ** (-2 * b) for b in (2, 3, 4, 6, 8)})
    assert allocate(costs, vals, budget_bits(list(n.values()), avg_bits=5))["bits"] == list(
        layers.values())
    with pytest.raises(SlimtorchError, match="bits must be"):
        resolve_recipe({**recipe, "mixed": {"avg_bits": 4, "bits": [1, 4]}})


def test_cli_sensitivity_file_to_recipe(tmp_path):
    torch.manual_seed(0)
    sens = layer_sensitivity(Tiny().eval(), torch.randn(32, 1, 8, 8), torch.randn(32, 1, 8, 8),
                             bits=(2, 4), probes=1, hessian_samples=16)
    import json
    (tmp_path / "sensitivity.json").write_text(json.dumps(sens))
    from slimtorch.cli import main
    out = tmp_path / "r.yaml"
    assert main(["allocate", str(tmp_path), "--avg-bits", "3", "--out", str(out)]) == 0
    r = load_recipe_text(out.read_text())
    assert {k: v.weights for k, v in r.overrides.items()}.keys() == {"c1", "c2", "fc"}
    assert main(["allocate", str(tmp_path), "--avg-bits", "1", "--out", str(out)]) == 2
    assert main(["allocate", str(tmp_path / "nope"), "--avg-bits", "3", "--out",
                 str(out)]) == 2


def test_report_shows_sensitivity(tmp_path):
    import json

    import slimtorch
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(64, 1, 8, 8)
    slimtorch.save(slimtorch.quantize(model, "w4a8", x[:32], self_check=False), tmp_path / "a")
    sens = layer_sensitivity(model, x[:32], x[32:], bits=(2, 4, 8), probes=1,
                             hessian_samples=16)
    (tmp_path / "a" / "sensitivity.json").write_text(json.dumps(sens))
    _, md = slimtorch.report([tmp_path / "a"], tmp_path / "r.html")
    text = md.read_text()
    assert "Per-layer sensitivity" in text
    for l in sens["layers"]:
        assert f"| {l['fqn']} | {l['params']} | {l['kl'][2]:.2e} |" in text
    assert f"| hawq | {sens['spearman']['hawq']['w2']:.3f} |" in text


def test_layer_override_dump_keeps_missing_keys_missing():
    from slimtorch.recipe import Recipe
    d = resolve_recipe("w4a8").to_dict()
    d["first_layer"] = {"activations": 8}
    again = Recipe.from_dict(Recipe.from_dict(d).to_dict())
    assert again.first_layer.model_fields_set == {"activations"}  # weights inherit, not float
    assert again.to_dict()["first_layer"] == {"activations": 8}


def test_block_sensitivity_is_the_units_weights_quantized_together(tmp_path):
    """Per block: the reconstruction units of several layers (ResNet-20's residual blocks);
    ΔKL = KL(float ‖ block's weights at b, activations A8) − KL(float ‖ activations only),
    recomputed here by switching exactly those layers' weight quantizers on."""
    from slimtorch.zoo.registry import weights_path
    if not weights_path("resnet20").is_file():
        pytest.skip("zoo weights not trained")
    from slimtorch.data.calibration import calibration_batches
    from slimtorch.eval.sensitivity import _kl, _logits, _prepared, sensitivity_recipe
    from slimtorch.quant.prepare import quant_layers, quant_state
    from slimtorch.quant.quantizer import Mode
    from slimtorch.zoo.sources import load_model
    model = load_model("zoo:resnet20")
    x = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(model, x[:24], x[24:], bits=(2,), probes=1, hessian_samples=8)
    blocks = {b["name"]: b for b in sens["blocks"]}
    assert list(blocks) == [f"layers.{i}" for i in range(9)]
    assert blocks["layers.3"]["layers"] == ["layers.3.shortcut.0", "layers.3.conv1",
                                            "layers.3.conv2"]
    qm = _prepared(model, sensitivity_recipe(resolve_recipe("w4a8"), 2),
                   calibration_batches(x[:24], 32), 0)
    held = calibration_batches(x[24:], 32)
    with torch.no_grad(), quant_state(qm, weights=False, acts=False):
        ref = _logits(qm, held)

    def kl_with(on):
        for f, m in quant_layers(qm):
            m.weight_quantizer.mode = Mode.QUANT if f in on else Mode.OFF
        return _kl(ref, _logits(qm, held))
    for name in ("layers.1", "layers.6"):
        want = kl_with(set(blocks[name]["layers"])) - kl_with(set())
        assert blocks[name]["kl"][2] == pytest.approx(want, rel=1e-6, abs=1e-9)
        per_layer = {l["fqn"]: l["kl"][2] for l in sens["layers"]}
        assert blocks[name]["sum_of_layers_kl"][2] == pytest.approx(
            sum(per_layer[f] for f in blocks[name]["layers"]))
    # the report shows the block table from sensitivity.json
    import json

    import slimtorch
    slimtorch.save(slimtorch.quantize(model, "w4a8", x[:24], self_check=False), tmp_path / "a")
    (tmp_path / "a" / "sensitivity.json").write_text(json.dumps(sens))
    _, md = slimtorch.report([tmp_path / "a"], tmp_path / "r.html")
    b6 = blocks["layers.6"]
    assert (f"| layers.6 | 3 | {b6['params']} | {b6['kl'][2]:.2e} "
            f"({b6['sum_of_layers_kl'][2]:.2e}) |") in md.read_text()


def test_dp_with_more_than_127_options_per_layer():
    """A layer may have hundreds of options (structured pruning levels, one per channel): the
    choice index must not overflow (it was int8)."""
    gen = torch.Generator().manual_seed(3)
    costs = [{k: k for k in range(200)}, {k: 2 * k for k in range(3)}]
    values = [{k: float(torch.rand(1, generator=gen)) for k in c} for c in costs]
    res = allocate(costs, values, 150)
    val, pick = _brute(costs, values, 150)
    assert res["value"] == pytest.approx(val) and res["cost"] <= 150
