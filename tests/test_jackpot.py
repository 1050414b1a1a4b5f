"""Lottery Jackpots: the first mask is the global-magnitude mask, the scores' gradient is
∂L/∂(W⊙M)⊙W, the search keeps each layer's count and the pretrained weights, and it lowers the
distillation loss of the magnitude mask."""
import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.recipe import resolve_recipe
from slimtorch.sparsity import masks_of
from slimtorch.sparsity.jackpot import initial_scores, masked_weight, topk_mask
from slimtorch.sparsity.masks import prune_lowest

pytestmark = pytest.mark.filterwarnings(
    "ignore::slimtorch.eval.selfcheck.QuantizationCheckWarning")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_initial_mask_is_global_magnitude_and_the_score_gradient_is_g_times_w():
    model = _mlp()
    layers = [(n, model.get_submodule(n), 0.6) for n in ("2", "4")]
    scores, kept = initial_scores(layers, 0.6)
    flat = torch.cat([model.get_submodule(n).weight.detach().abs().reshape(-1) for n in "24"])
    ref = prune_lowest(flat, 0.6).split([1024, 1024])
    for (n, _, _), r in zip(layers, ref):
        assert torch.equal(topk_mask(scores[n], kept[n]), r.reshape(32, 32))
        assert torch.equal(scores[n].detach() == 1, r.reshape(32, 32))  # 0.99 where cut
        assert torch.allclose(scores[n].detach()[~r.reshape(32, 32)], torch.tensor(0.99))
    w = torch.randn(3, 4)
    s = torch.rand(3, 4, requires_grad=True)
    mask = topk_mask(s, 5)
    out = masked_weight(w, s, mask)
    assert torch.equal(out.detach(), w * mask)
    g = torch.randn(3, 4)
    (out * g).sum().backward()
    assert torch.allclose(s.grad, g * w)  # straight through the top-k, pruned entries too


def test_search_keeps_counts_and_weights_and_beats_the_magnitude_mask():
    model = _mlp(1)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(2))
    recipe = {"name": "j", "weights": None,
              "methods": [{"name": "lottery_jackpot", "sparsity": 0.7, "epochs": 30,
                           "batch_size": 64, "lr": 0.5}]}
    q = slimtorch.sparsify(model, recipe, x)
    mag = slimtorch.sparsify(model, {"name": "m", "weights": None, "methods": [
        {"name": "magnitude", "sparsity": 0.7, "scope": "global"}]}, x)
    stats = q._slimtorch_meta["methods"][0]["stats"]
    for f, m in masks_of(q).items():
        assert int(m.sum()) == int(masks_of(mag)[f].sum())           # same layer ratios
        w = model.get_submodule(f).weight.detach()
        assert torch.equal(q.get_submodule(f).weight, w * m)          # weights stay pretrained
    assert sum(st["swapped_from_magnitude"] for st in stats["layers"].values()) > 0
    y = model(x)
    err = lambda m: (m(x) - y).pow(2).mean().item()
    assert err(q) < 0.9 * err(mag)
    assert stats["epochs"][-1]["loss"] < stats["epochs"][0]["loss"]


def test_jackpot_settings_errors():
    with pytest.raises(RecipeError, match="unstructured"):
        resolve_recipe({"name": "j", "weights": None,
                        "methods": [{"name": "lottery_jackpot", "pattern": "2:4"}]})
