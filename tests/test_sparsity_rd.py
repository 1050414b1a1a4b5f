"""Layer-adaptive sparsity by the rate-distortion DP (``allocation: rd``): the distortion curve
is the output MSE of pruning one layer alone, the DP is the optimum of the additive problem
under the global budget, the masks follow its ratios, SR-STE after it keeps them, bad input."""
import itertools

import pytest
import torch

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.sparsity import masks_of, rd
from slimtorch.sparsity.masks import parse_pattern, select

from test_sparsity import MLP, _inputs, _sparse_recipe

pytestmark = pytest.mark.filterwarnings("ignore::slimtorch.eval.selfcheck.QuantizationCheckWarning")


def _run(monkeypatch, method="magnitude", extra=(), **kw):
    """sparsify with allocation: rd, keeping what rd_ratios returned."""
    got = []
    orig = rd.rd_ratios
    monkeypatch.setattr(rd, "rd_ratios", lambda *a: got.append(orig(*a)) or got[-1])
    model, x = MLP(), _inputs()
    recipe = _sparse_recipe(method, sparsity=0.6, allocation="rd", dense_first=False,
                            dense_last=False, rd_samples=128, **kw)
    recipe["methods"] += list(extra)
    q = slimtorch.sparsify(model, recipe, x)
    return model, x, q, got[0]


def test_rd_curve_is_one_layer_output_mse_and_the_dp_is_optimal(monkeypatch):
    model, x, q, (ratios, record) = _run(monkeypatch)
    curves = record["curves"]
    assert list(curves) == ["fc1", "fc2", "fc3"] and record["samples"] == 128
    # δ_fc2(30 %): only fc2 pruned by magnitude to 30 %, mean squared output error per sample
    ref = model(x[:128])
    pruned = MLP()
    w = pruned.fc2.weight.detach()
    pruned.fc2.weight.data = w * select(w.abs(), parse_pattern(0.5, None), 0.3)
    want = ((pruned(x[:128]) - ref) ** 2).sum(1).mean().item()
    assert curves["fc2"][30] == pytest.approx(want, rel=1e-4)
    assert curves["fc1"][0] == pytest.approx(0.0, abs=1e-10)
    # the DP's choice is the brute-force optimum of Σδ under Σ kept ≤ (1 − 0.6)·Σ n
    sizes = {f: model.get_submodule(f).weight.numel() for f in curves}
    budget = int(0.4 * sum(sizes.values()))
    best = min((sum(curves[f][p] for f, p in zip(curves, pick)), pick)
               for pick in itertools.product(rd.RD_GRID, repeat=3)
               if sum(round(sizes[f] * (100 - p) / 100) for f, p in zip(curves, pick)) <= budget)
    assert [round(ratios[f] * 100) for f in curves] == list(best[1])
    assert record["distortion"] == pytest.approx(best[0])
    assert record["distortion"] <= record["uniform_distortion"]
    assert len(set(ratios.values())) > 1  # adaptive: not every layer at 60 %
    # the masks are the ratios, and the resolved config (what the artifact keeps) lists them
    for f, m in masks_of(q).items():
        assert abs((1 - m.float().mean().item()) - ratios[f]) < 2 / m.numel()
    cfg = q._slimtorch_meta["methods"][0]["config"]
    assert cfg["ratios"] == {f: r for f, r in ratios.items() if r > 0}
    kept = sum(int(m.sum()) for m in masks_of(q).values())
    assert kept <= budget + len(sizes)  # the budget, up to each layer's rounding


def test_srste_after_rd_keeps_its_ratios(monkeypatch):
    _, _, q, (ratios, _) = _run(monkeypatch, "sparsegpt",
                                extra=[{"name": "srste", "epochs": 1, "batch_size": 64}])
    for f, m in masks_of(q).items():
        assert abs((1 - m.float().mean().item()) - ratios[f]) < 2 / m.numel(), f


@pytest.mark.parametrize("kw, needle", [
    ({"pattern": "2:4"}, "allocation: rd spreads one unstructured sparsity"),
    ({"scope": "global", "sparsity": 0.5}, "scope: global sets every layer's ratio"),
])
def test_rd_bad_settings_name_the_fix(kw, needle):
    with pytest.raises(RecipeError, match=needle):
        slimtorch.resolve_recipe(_sparse_recipe("magnitude", allocation="rd", **kw))


def test_rd_shorthand_name():
    r = slimtorch.resolve_recipe("50-sparsegpt-rd")
    assert r.methods[0].allocation == "rd" and r.methods[0].sparsity == pytest.approx(0.5)
    assert slimtorch.resolve_recipe("50-sparsegpt").methods[0].allocation == "uniform"
    with pytest.raises(RecipeError, match="no N:M pattern"):
        slimtorch.resolve_recipe("2:4-sparsegpt-rd")
