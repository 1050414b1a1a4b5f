"""PQ Index and SAP: the index and the round's prune ratio against hand computations, and a
round that prunes more of a layer whose weights are dominated by a few."""
import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.recipe import resolve_recipe
from slimtorch.sparsity import masks_of
from slimtorch.sparsity.sap import pq_index, sap_ratio

pytestmark = pytest.mark.filterwarnings(
    "ignore::slimtorch.eval.selfcheck.QuantizationCheckWarning")


def test_pq_index_by_hand():
    assert pq_index(torch.ones(4)) == pytest.approx(0.0)            # all equal: not sparse
    # w = (1, 0, 0, 0): 1 − 4^{1−2}·(Σ√|w|)²/Σ|w| = 1 − 1/4
    assert pq_index(torch.tensor([1., 0., 0., 0.])) == pytest.approx(0.75)
    w = torch.tensor([4., 1., 1., 0.])  # (2 + 1 + 1)² / 6 = 16/6; I = 1 − 16/24
    assert pq_index(w) == pytest.approx(1 - 16 / 24)
    assert pq_index(-w) == pytest.approx(pq_index(w))                # magnitudes only


def test_sap_ratio_by_hand():
    # m/d = (1+η)^{−q/(q−p)}(1−I)^{qp/(q−p)} = (1.001)^{-2}(1 − I) at p = 0.5, q = 1
    for index in (0.0, 0.1, 0.3):
        keep = 1.001 ** -2 * (1 - index)
        assert sap_ratio(index) == pytest.approx(min(1.2 * (1 - keep), 0.9))
    assert sap_ratio(0.75) == 0.9                                     # capped at β
    assert sap_ratio(0.2, p=0.5, q=2.0, eta=0.0, gamma=1.0) == pytest.approx(
        1 - 0.8 ** (1.0 / 1.5))


def test_a_round_prunes_the_peaky_layer_more_and_only_remaining_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64),
                          nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.uniform_(0.9, 1.1)                           # flat: I ≈ 0
        model[2].weight.copy_(torch.randn(64, 64) ** 3)              # heavy tails: I large
    x = torch.randn(32, 16)
    recipe = {"name": "s", "weights": None, "methods": ["sap", "sap"]}
    q = slimtorch.sparsify(model, recipe, x)
    first, second = (r["stats"]["layers"] for r in q._slimtorch_meta["methods"])
    assert first["1"]["round_ratio"] < 0.01 < 0.3 < first["2"]["round_ratio"]
    assert first["2"]["pq_index"] == pytest.approx(pq_index(model[2].weight), abs=1e-6)
    mask = masks_of(q)["2"]
    kept_after_one = round(64 * 64 * (1 - first["2"]["sparsity"]))
    assert second["2"]["pruned_now"] == int(kept_after_one * second["2"]["round_ratio"])
    assert int((~mask).sum()) == 64 * 64 - kept_after_one + second["2"]["pruned_now"]


def test_sap_refuses_a_fixed_sparsity():
    with pytest.raises(RecipeError, match="PQ Index"):
        resolve_recipe({"name": "s", "weights": None, "methods": [{"name": "sap",
                                                                   "sparsity": 0.5}]})
