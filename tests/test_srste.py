"""SR-STE recovery: the gradient rule (STE to the dense W plus λ(1−M)⊙W), the mask recomputed
from |W| every step, the pattern resolved from the previous sparsity method, recovery lowering
the distillation loss, training data plumbing, and the errors bad input gets."""
import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import RecipeError, SlimtorchError
from slimtorch.recipe import resolve_recipe
from slimtorch.sparsity import masks_of
from slimtorch.sparsity.masks import Pattern
from slimtorch.sparsity.srste import SRSTEConfig, distill_loss, sparse_mask, step

from conftest import make_cnn

pytestmark = pytest.mark.filterwarnings("ignore::slimtorch.eval.selfcheck.QuantizationCheckWarning")

NM24 = Pattern(0.5, 2, 4)


class MLP(nn.Module):
    def __init__(self, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class NoStep:
    def step(self):
        pass


def _x(n=256, d=16, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _recipe(*methods):
    return {"name": "t", "weights": None, "methods": list(methods)}


# ------------------------------------------------------------------ the rule
def test_gradient_is_straight_through_plus_sparse_refined_term():
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 5), nn.Linear(8, 5)
    x = torch.randn(32, 8)
    w = student.weight.detach().clone().requires_grad_()
    b = student.bias.detach().clone().requires_grad_()
    cfg = SRSTEConfig(pattern="2:4", decay=0.3, temperature=2.0)
    model, weights, masks = nn.Sequential(student), {"0": (w, b)}, {}
    step(model, teacher, weights, masks, NM24, {"0": 0}, x, cfg, NoStep())
    m = sparse_mask(w, NM24, 0)
    assert torch.equal(masks["0"], m)
    # by hand: W̃ = W⊙M as a leaf, the distillation loss, g = ∂L/∂W̃
    wt = (w.detach() * m).requires_grad_()
    bt = b.detach().clone().requires_grad_()
    t = teacher(x).detach()
    loss = distill_loss(nn.functional.linear(x, wt, bt), t, 2.0)
    g, gb = torch.autograd.grad(loss, [wt, bt])
    expect = g + 0.3 * (~m).float() * w.detach()
    torch.testing.assert_close(w.grad, expect, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, gb, rtol=1e-5, atol=1e-7)
    # straight through: the pruned entries get the dense gradient, not zero
    assert (g[~m].abs() > 0).all()


def test_distill_loss_kl_with_temperature_and_mse():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    T = 3.0
    p = torch.softmax(t / T, 1)
    kl = (p * (p.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(distill_loss(s, t, T), kl)
    a, c = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(distill_loss(a, c, T), ((a - c) ** 2).mean())


def test_mask_recomputed_from_magnitude_every_step():
    """A pruned weight the gradient grows past a kept one swaps into the mask."""
    student = nn.Sequential(nn.Linear(4, 1, bias=False))
    teacher = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
    w = torch.tensor([[1.0, 0.9, 0.1, 0.05]], requires_grad=True)
    weights, masks = {"0": (w, None)}, {}
    cfg = SRSTEConfig(pattern="2:4")
    opt = torch.optim.SGD([w], lr=0.05)
    x = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(0))  # 3-D: MSE
    step(student, teacher, weights, masks, NM24, {"0": 0}, x, cfg, opt)
    assert masks["0"].tolist() == [[True, True, False, False]]
    for _ in range(200):
        step(student, teacher, weights, masks, NM24, {"0": 0}, x, cfg, opt)
        if masks["0"][0, 2]:
            break
    assert masks["0"][0, 2], w  # index 2 grew past a kept weight and swapped in
    assert masks["0"].sum() == 2


def test_unstructured_mask_keeps_the_layer_pruned_count():
    w = torch.tensor([[0.3, -2.0, 0.1], [5.0, -0.2, 0.4]])
    keep = sparse_mask(w, Pattern(0.5), 3)
    assert keep.tolist() == [[False, True, False], [True, False, True]]  # 0.1, 0.2, 0.3 go


# ------------------------------------------------------------------ recipe resolution
def test_pattern_and_layers_resolve_from_the_previous_method():
    r = resolve_recipe(_recipe({"name": "sparsegpt", "pattern": "2:4", "dense_first": False},
                               {"name": "srste", "epochs": 1, "batch_size": 64}))
    q = slimtorch.sparsify(MLP(), r, _x(), train_data=_x(512, seed=2))
    rec = q._slimtorch_meta["methods"][1]
    assert rec["name"] == "srste"
    assert rec["config"]["pattern"] == "2:4" and rec["config"]["dense_first"] is False
    masks = masks_of(q)
    assert set(masks) == {"fc1", "fc2"}  # the last layer stays dense, as sparsegpt left it
    for m in masks.values():
        assert m.reshape(-1, 4).sum(1).eq(2).all()
    assert rec["stats"]["data"] == "train" and rec["stats"]["samples"] == 512
    assert [e["epoch"] for e in rec["stats"]["epochs"]] == [1]


def test_unstructured_global_ratios_are_kept_per_layer():
    r = _recipe({"name": "magnitude", "sparsity": 0.6, "scope": "global"},
                {"name": "srste", "epochs": 1, "batch_size": 64})
    one = slimtorch.sparsify(MLP(), _recipe(r["methods"][0]), _x())
    q = slimtorch.sparsify(MLP(), r, _x())
    for f, m in masks_of(one).items():  # SR-STE moves weights, not each layer's count
        assert int((~masks_of(q)[f]).sum()) == int((~m).sum())


def test_srste_alone_needs_a_pattern_and_trains_from_dense_with_one():
    with pytest.raises(RecipeError, match="no sparsity method runs before it"):
        slimtorch.sparsify(MLP(), _recipe({"name": "srste", "epochs": 1}), _x())
    q = slimtorch.sparsify(MLP(), _recipe({"name": "srste", "epochs": 1, "pattern": "2:4"}),
                           _x())
    st = q._slimtorch_meta["methods"][0]["stats"]
    assert st["data"] == "calibration" and "calibration" in st["note"]
    assert masks_of(q)["fc2"].reshape(-1, 4).sum(1).eq(2).all()


# ------------------------------------------------------------------ recovery
def test_recovery_lowers_the_distillation_loss():
    model, x, held = MLP(), _x(512), _x(256, seed=7)
    one = slimtorch.sparsify(model, _recipe({"name": "magnitude", "pattern": "2:4"}), x)
    r = _recipe({"name": "magnitude", "pattern": "2:4"},
                {"name": "srste", "epochs": 4, "batch_size": 32, "lr": 0.05})
    rec = slimtorch.sparsify(model, r, x, train_data=_x(2048, seed=3))
    with torch.no_grad():
        t = model(held)
        before, after = distill_loss(one(held), t, 1.0), distill_loss(rec(held), t, 1.0)
    assert after < 0.7 * before, (before, after)
    losses = [e["loss"] for e in rec._slimtorch_meta["methods"][1]["stats"]["epochs"]]
    assert losses[-1] < losses[0]
    for m in masks_of(rec).values():  # the final mask is N:M and the weights obey it
        assert m.reshape(-1, 4).sum(1).eq(2).all()
    assert all((l.weight[~l.weight_mask] == 0).all() for n, l in rec.named_modules()
               if getattr(l, "weight_mask", None) is not None)


def test_recovery_on_a_cnn_with_quantized_weights_keeps_pruned_codes_zero():
    model = make_cnn()
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    r = {"name": "t", "weights": {"bits": 8}, "methods": [
        {"name": "magnitude", "pattern": "2:4", "dense_last": False},
        {"name": "srste", "epochs": 1, "batch_size": 16}]}
    q = slimtorch.sparsify(model, r, x)
    masks = masks_of(q)
    assert set(masks) == {"conv1", "conv2", "fc"}  # the stem stays dense
    for f, m in masks.items():
        layer = q.get_submodule(f)
        assert layer.frozen and (layer.weight[~m] == 0).all()


# ------------------------------------------------------------------ errors
class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, x):
        return {"logits": self.net(x)}


def test_non_tensor_output_and_inplace_are_clear_errors():
    r = _recipe({"name": "magnitude", "pattern": "2:4"}, {"name": "srste", "epochs": 1})
    with pytest.raises(RecipeError, match="forward returns one tensor"):
        slimtorch.sparsify(DictOut(), r, _x(), self_check=False)
    with pytest.raises(RecipeError, match="inplace"):
        slimtorch.sparsify(MLP(), r, _x(), inplace=True)


def test_config_errors_and_train_size_without_a_training_method():
    with pytest.raises(RecipeError, match="not both"):
        resolve_recipe(_recipe({"name": "srste", "pattern": "2:4", "sparsity": 0.5}))
    with pytest.raises(RecipeError, match="epochs"):
        resolve_recipe(_recipe({"name": "sparsegpt", "pattern": "2:4"},
                               {"name": "srste", "epochs": 0}))
    from types import SimpleNamespace
    from slimtorch.pipeline import training_data
    task = SimpleNamespace(kind="embedding")  # a task without a training split
    plain = resolve_recipe(_recipe({"name": "magnitude", "pattern": "2:4"}))
    assert training_data(task, plain, None, 0) == (None, {})
    with pytest.raises(SlimtorchError, match="drop --train-size"):
        training_data(task, plain, 100, 0)
    rec = resolve_recipe(_recipe({"name": "magnitude", "pattern": "2:4"},
                                 {"name": "srste"}))
    with pytest.raises(SlimtorchError, match="no training split"):
        training_data(task, rec, 100, 0)
    with pytest.raises(SlimtorchError, match="at least 1"):
        training_data(task, rec, 0, 0)


def test_shipped_recipe_runs_sparsegpt_then_srste():
    r = resolve_recipe("2of4-sparsegpt-srste")
    assert r.method_names == ["sparsegpt", "srste"] and r.weights is None
    assert r.methods[0].pattern == "2:4" and r.methods[1].epochs == 3
    assert r.methods[1].pattern is None  # resolved at run time from sparsegpt


def test_epoch_batches_cover_every_sample_once_in_a_seeded_order():
    from slimtorch.sparsity.srste import epoch_batches, epoch_steps
    items = list(torch.arange(10.).reshape(10, 1).split(4))  # batches of 4, 4, 2
    a = list(epoch_batches(items, 3, torch.Generator().manual_seed(0)))
    b = list(epoch_batches(items, 3, torch.Generator().manual_seed(0)))
    assert [len(x) for x in a] == [3, 3, 3, 1] and epoch_steps(items, 3) == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).reshape(-1).tolist()) == list(range(10))
    tuples = [(torch.ones(2), i) for i in range(5)]  # other items: permuted, not re-batched
    got = list(epoch_batches(tuples, 3, torch.Generator().manual_seed(0)))
    assert sorted(i for _, i in got) == list(range(5)) and epoch_steps(tuples, 3) == 5
