"""HESSO (prune/hesso.py): the projection schedule reaches exactly zero, the saliency formula,
the periods' cumulative selection to the MACs target, the zeroed model equal to the removed
one, the shorthand, the artifact, and the errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import slimtorch
from slimtorch.errors import PruningError, RecipeError
from slimtorch.graph.capture import capture
from slimtorch.methods import handler_for
from slimtorch.prune import criteria, pruning_record
from slimtorch.prune.groups import dependency_groups
from slimtorch.prune.hesso import HessoConfig, Schedule, factor
from slimtorch.prune.method import Plan, Target
from slimtorch.prune.surgery import unit_positions
from slimtorch.zoo.sources import load_model
from test_prune import Mixed, _realistic


def test_projection_ramps_to_exactly_zero():
    for d in (1, 2, 5, 19):
        prod = 1.0
        for t in range(d):
            prod *= factor(t, d)
            assert prod == pytest.approx((d - t - 1) / d)
        assert prod == 0.0 and factor(d - 1, d) == 0.0


def test_saliency_is_the_five_normalised_terms():
    model = _realistic(Mixed())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    groups = dependency_groups(model, capture(model, x))
    model(x).square().mean().backward()
    named = dict(model.named_modules())

    def sums(u):  # by hand over the unit's slices: Σw², Σg², Σwg, count
        ww = gg = wg = n = 0.0
        for f, r, pos in u.where:
            w, g = named[f].weight.detach().double(), named[f].weight.grad.double()
            sl = (lambda t: t[:, pos]) if r == "in" and getattr(named[f], "groups", 1) == 1 else (
                lambda t: t[pos])
            ww += float((sl(w) ** 2).sum())
            gg += float((sl(g) ** 2).sum())
            wg += float((sl(w) * sl(g)).sum())
            n += sl(w).numel()
        return ww, gg, wg, n
    raw = torch.tensor([sums(u) for u in groups.units], dtype=torch.float64)
    ww, gg, wg, n = raw.unbind(1)
    want = {"magnitude": ww.sqrt(), "avg_magnitude": ww.sqrt() / n,
            "cosine_similarity": (wg / (ww * gg).sqrt()).nan_to_num(0.0) + 1,
            "taylor_first_order": wg.abs(), "taylor_second_order": 0.5 * wg ** 2}
    terms = criteria.saliency_terms(model, groups)
    for k in criteria.HESSO_TERMS:
        assert torch.allclose(terms[k], want[k], rtol=1e-6, atol=1e-12), k
    s = criteria.saliency(model, groups, dict.fromkeys(criteria.HESSO_TERMS, 0.2))
    expect = sum(0.2 * want[k] / want[k].norm() for k in criteria.HESSO_TERMS)
    assert torch.allclose(s, expect, rtol=1e-6)
    one = criteria.saliency(model, groups, {"taylor_first_order": 1.0})
    assert torch.allclose(one, want["taylor_first_order"] / want["taylor_first_order"].norm())


def test_schedule_projects_each_period_to_zero_and_holds_it():
    """Drive the schedule by hand (random gradients and a noisy optimizer step): every
    period's units reach exactly 0 at its last step and stay 0 under later updates; the
    selection is cumulative and ends at the target."""
    model = load_model("zoo:resnet20").eval()
    calib = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))]
    cfg = HessoConfig(target=Target(macs=0.5), periods=3, steps=20, prune_until=0.8)
    plan = Plan(model, cfg, SimpleNamespace(batches=calib))
    sched = Schedule(model, plan, cfg, total=20)
    assert sched.d == 5  # round(0.8·20)=16 steps over 3 periods
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    history = []
    for step in range(20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        sched.before_step(step)
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        before = set(sched.pruned)
        sched.after_step(step)
        history.append(set(sched.pruned))
        at = sched.where(step)
        if at is not None and at[1] == sched.d - 1:
            new = sched.pruned - before
            assert new
            named = dict(model.named_modules())
            for (fqn, _), pos in unit_positions(plan.groups, sched.pruned).items():
                mod = named[fqn]
                assert mod.weight[pos].abs().max() == 0
                assert mod.bias is None or mod.bias[pos].abs().max() == 0
    assert all(a <= b for a, b in zip(history, history[1:]))  # cumulative
    assert [p["period"] for p in sched.log] == [0, 1, 2]
    ratios = [p["ratio"] for p in sched.log]
    assert ratios[0] > ratios[1] > ratios[2] and abs(ratios[-1] - 0.5) <= cfg.tolerance
    assert not sched.active and sched.where(15) is None  # step 15: after the 3·5 steps


@pytest.fixture(scope="module")
def resnet():
    return load_model("zoo:resnet20").eval()


@pytest.fixture(scope="module")
def calib():
    return [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i))
            for i in range(3)]


def test_hesso_prunes_to_target_equal_to_its_zeroed_model(resnet, calib, tmp_path):
    recipe = {"name": "h", "weights": None, "methods": [
        {"name": "hesso", "target": {"macs": 0.5}, "steps": 18, "batch_size": 16,
         "periods": 3, "lr": 0.005}]}
    pm = slimtorch.prune(resnet, recipe, calib, self_check=False)
    rec = pruning_record(pm)
    assert rec["criterion"] == "hesso" and abs(rec["macs"]["ratio"] - 0.5) <= 0.02
    assert rec["hesso"]["removal_max_abs_diff"] < 1e-4
    assert [p["step"] for p in rec["hesso"]["periods"]] == [1, 4, 7]  # 9 steps / 3 periods
    assert rec["training"]["steps"] == 18
    convs = [m for m in pm.modules() if isinstance(m, torch.nn.Conv2d)][1:]
    assert all(m.out_channels % 8 == 0 for m in convs)
    slimtorch.save(pm, tmp_path / "h")
    back = slimtorch.load(tmp_path / "h", model=resnet)
    with torch.no_grad():
        assert torch.equal(back.eval()(calib[0]), pm.eval()(calib[0]))
    assert not any(torch.equal(a, b) for a, b in zip(
        [m.weight for m in pm.modules() if isinstance(m, torch.nn.Linear)],
        [m.weight for m in resnet.modules() if isinstance(m, torch.nn.Linear)]))


def test_hesso_shorthand_and_errors(resnet, calib):
    r = slimtorch.resolve_recipe("macs-0.5-hesso-kd")
    assert handler_for(r.methods[0]).name == "hesso" and r.methods[0].target.macs == 0.5
    assert handler_for(r.methods[1]).name == "recover"
    with pytest.raises(RecipeError):
        slimtorch.resolve_recipe("macs-0.5-hesso-rd")
    few = {"name": "h", "weights": None, "methods": [
        {"name": "hesso", "steps": 4, "periods": 10, "batch_size": 16}]}
    with pytest.raises(PruningError, match="periods do not fit"):
        slimtorch.prune(resnet, few, calib, self_check=False)
    pinned = {"name": "h", "weights": None, "methods": [
        {"name": "hesso", "steps": 40, "keep": ["re:.*conv.*"]}]}
    w0 = copy.deepcopy(resnet.state_dict())
    with pytest.raises(PruningError, match="cannot be met"):
        slimtorch.prune(resnet, pinned, calib, self_check=False)
    assert all(torch.equal(v, w0[k]) for k, v in resnet.state_dict().items())
    with pytest.raises(RecipeError, match="prune_until"):
        slimtorch.resolve_recipe({"name": "h", "weights": None, "methods": [
            {"name": "hesso", "start": 0.6, "prune_until": 0.5}]})
