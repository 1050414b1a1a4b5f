"""Structured pruning: groups from the graph, physical pruning equal to the masked float model,
criteria formulas, targets, pins, the API/CLI, the artifact, quantization after pruning, ONNX."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.errors import PruningError, RecipeError, SlimtorchError
from slimtorch.graph.capture import capture
from slimtorch.methods import MethodContext, handler_for
from slimtorch.prune import criteria, pruning_record
from slimtorch.prune.groups import dependency_groups
from slimtorch.prune.surgery import count_macs, kept_indices, mask_model, replay, shrink
from slimtorch.zoo.sources import load_model


class Mixed(nn.Module):
    """cat, chunk, split, depthwise, SE gating (mul), grouped conv, flatten into a Linear,
    a residual add over a concat, and an MLP."""

    def __init__(self, grouped: bool = True):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 1)
        self.bn_c = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn_dw = nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.g = nn.Conv2d(16, 16, 1, groups=4) if grouped else nn.Identity()
        self.left, self.right = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), self.b(x)], 1)     # [B,16,H,W]
        z = F.relu(self.bn_c(self.c(y))) + y                             # add over a cat
        z = F.relu(self.bn_dw(self.dw(z)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(z.mean((2, 3), keepdim=True)))))
        z = z * s
        z = self.g(z)
        p, q = z.chunk(2, 1)
        z = torch.cat([self.left(p), self.right(q)], 1)                 # [B,12,H,W]
        z = F.adaptive_avg_pool2d(z, 4).flatten(1)
        return self.fc2(F.gelu(self.fc1(z)))


def _realistic(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


MODELS = {
    "mixed": (lambda: _realistic(Mixed()), (4, 3, 16, 16)),
    "mixed-joined": (lambda: _realistic(Mixed(grouped=False)), (4, 3, 16, 16)),
    "resnet20": (lambda: load_model("zoo:resnet20").eval(), (4, 1, 28, 28)),
    "mobilenetv2": (lambda: load_model("zoo:mobilenetv2").eval(), (4, 1, 28, 28)),
    "vit": (lambda: load_model("zoo:vit").eval(), (4, 1, 28, 28)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked_float(name):
    make, shape = MODELS[name]
    model, x = make(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    groups = dependency_groups(model, capture(model, x))
    assert groups.units
    gen = torch.Generator().manual_seed(2)
    pruned = set(torch.randperm(len(groups.units), generator=gen)[
        :int(0.3 * len(groups.units))].tolist())
    small = copy.deepcopy(model)
    shrink(small, kept_indices(groups, pruned))
    ref = mask_model(copy.deepcopy(model), groups, pruned)
    with torch.no_grad():
        got, want = small(x), ref(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_groups_follow_residuals_concat_depthwise_and_flatten():
    model = _realistic(Mixed())
    x = torch.randn(2, 3, 16, 16)
    groups = dependency_groups(model, capture(model, x))
    layers = {tuple(groups.group_layers(g)) for g in range(len(groups.groups))}
    # grouped conv g pins its input channels: the add over cat(a, b), c, the depthwise conv
    # and the SE gate all carry them; fc2 reaches the output; flatten → fc1 follows
    why = {e["layer"]: e["why"] for e in groups.excluded}
    assert all("grouped convolution" in why[f] for f in ("a", "b", "c", "dw", "se2"))
    assert "network output" in why["fc2"]
    joined = _realistic(Mixed(grouped=False))
    g2 = dependency_groups(joined, capture(joined, x))
    # without it: the add over cat(a, b) joins c's output with a's and b's position by
    # position, the depthwise conv and the SE gate's output carry the same channels
    # (c's first 8 channels with a's, its last 8 with b's: the cat offset), and chunk(2)
    # joins channel i with channel 8 + i (torch re-splits the pruned width in equal halves)
    got = {tuple(g2.group_layers(g)): g for g in range(len(g2.groups))}
    assert ("a", "b", "c", "dw", "se2") in got
    stream = g2.groups[got[("a", "b", "c", "dw", "se2")]]
    assert len(stream) == 8
    pos = {(f, r): p.tolist() for f, r, p in g2.units[stream[3]].where}
    assert pos[("c", "out")] == [3, 11] and pos[("a", "out")] == [3] == pos[("b", "out")]
    # one unit of it removed: the model still runs (left/right each lose one input)
    small = copy.deepcopy(joined)
    shrink(small, kept_indices(g2, {stream[3]}))
    assert small(x).shape == (2, 10) and small.left.in_channels == 7
    assert ("left",) in layers and ("right",) in layers and ("fc1",) in layers
    unit = next(u for u in groups.units if any(f == "left" for f, _, _ in u.where))
    pos = {(f, r): p.tolist() for f, r, p in unit.where}
    c = pos[("left", "out")][0]
    # channel c of the pooled 4×4 map is features c·16 … c·16+15 of fc1 (flatten blocks)
    assert pos[("fc1", "in")] == list(range(c * 16, c * 16 + 16))
    unit = next(u for u in groups.units if any(f == "right" for f, _, _ in u.where))
    pos = {(f, r): p.tolist() for f, r, p in unit.where}
    c = pos[("right", "out")][0]  # concat offset: right's channels come after left's 6
    assert pos[("fc1", "in")] == list(range((6 + c) * 16, (6 + c) * 16 + 16))


def test_split_with_constant_sizes_blocks_its_channels():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.l, self.r = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            p, q = self.a(x).split([4, 4], 1)
            return self.fc(torch.cat([self.l(p), self.r(q)], 1).mean((2, 3)))

    model = Split().eval()
    groups = dependency_groups(model, capture(model, torch.randn(2, 3, 8, 8)))
    why = {e["layer"]: e["why"] for e in groups.excluded}
    assert "constants of the model's code" in why["a"]
    assert not any(f == "a" for u in groups.units for f, _, _ in u.where)


def test_resnet_residual_stream_is_one_group():
    model = load_model("zoo:resnet20", pretrained=False).eval()
    x = torch.randn(2, 1, 28, 28)
    groups = dependency_groups(model, capture(model, x))
    stem = next(g for g in range(len(groups.groups)) if any(
        "layers.0.conv2" == f for f in groups.group_layers(g)))
    joined = groups.group_layers(stem)
    assert sum(f.endswith("conv2") for f in joined) >= 3 and len(groups.groups[stem]) == 16


def test_criteria_formulas():
    model = _realistic(Mixed())
    x = torch.randn(4, 3, 16, 16)
    groups = dependency_groups(model, capture(model, x))
    u = groups.units[0]
    named = dict(model.named_modules())

    def parts(fn):
        total = 0.0
        for f, r, pos in u.where:
            w = named[f].weight
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            sl = (lambda t: t[:, pos]) if r == "in" and named[f].groups == 1 else (
                lambda t: t[pos]) if r != "in" else (lambda t: t[pos])
            total += float(fn(sl(w.detach()), sl(g)))
        return total
    l2 = criteria.magnitude(model, groups, 2)[0].item()
    assert l2 == pytest.approx(parts(lambda w, g: (w ** 2).sum()) ** 0.5, rel=1e-6)
    l1 = criteria.magnitude(model, groups, 1)[0].item()
    assert l1 == pytest.approx(parts(lambda w, g: w.abs().sum()), rel=1e-6)
    tay = criteria.taylor(model, groups, [x])
    out = model(x)
    criteria.taylor_loss(out).backward()
    assert tay[0].item() == pytest.approx(parts(lambda w, g: (w * g).abs().sum()), rel=1e-4)
    normed = criteria.normalize_mean(tay, groups)
    g0 = torch.tensor(groups.groups[groups.units[0].group])
    assert normed[g0].mean().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def resnet():
    return load_model("zoo:resnet20").eval()


@pytest.fixture(scope="module")
def calib():
    return [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i))
            for i in range(2)]


@pytest.mark.parametrize("crit", ["magnitude", "taylor", "random"])
def test_prune_meets_macs_target(resnet, calib, crit):
    pm = slimtorch.prune(resnet, f"macs-0.5-{crit}", calib, self_check=False)
    rec = pruning_record(pm)
    assert abs(rec["macs"]["ratio"] - 0.5) <= 0.02
    # every channel count a group could round is a multiple of 8 (round_to: 8)
    convs = [m for m in pm.modules() if isinstance(m, nn.Conv2d)][1:]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert pm(calib[0]).shape == (16, 10)


def test_params_target_and_pins(resnet, calib):
    recipe = {"name": "p", "weights": None, "methods": [
        {"name": "prune", "target": {"params": 0.6}, "keep": ["re:layers\\.0\\..*"],
         "round_to": None}]}
    pm = slimtorch.prune(resnet, recipe, calib, self_check=False)
    rec = pruning_record(pm)
    assert abs(rec["params"]["ratio"] - 0.6) <= 0.02
    assert "layers.0.conv1" not in rec["history"]["modules"]
    assert "layers.0.conv2" not in rec["history"]["modules"]


def test_bad_targets_and_pins(resnet, calib):
    bad = {"name": "p", "weights": None, "methods": [{"name": "prune", "target": {"macs": 0.5},
                                                      "keep": ["re:.*conv.*"]}]}
    with pytest.raises(PruningError, match="cannot be met"):
        slimtorch.prune(resnet, bad, calib, self_check=False)
    nothing = {"name": "p", "weights": None, "methods": [{"name": "prune", "keep": ["nope"]}]}
    with pytest.raises(PruningError, match="names no module"):
        slimtorch.prune(resnet, nothing, calib, self_check=False)
    with pytest.raises(RecipeError, match="one of macs or params"):
        slimtorch.resolve_recipe({"name": "p", "weights": None, "methods": [
            {"name": "prune", "target": {"macs": 0.5, "params": 0.5}}]})
    with pytest.raises(RecipeError, match="list them before"):
        slimtorch.resolve_recipe({"name": "p", "weights": {"bits": 8},
                                  "methods": ["rtn", {"name": "prune"}]})
    with pytest.raises(RecipeError, match="no prune method"):
        slimtorch.prune(resnet, "w8a8", calib)


def test_artifact_replays_history_and_quantization_composes(resnet, calib, tmp_path):
    pm = slimtorch.prune(resnet, "macs-0.5-taylor-w8a8", calib)
    rec = pruning_record(pm)
    assert rec["macs"]["ratio"] <= 0.52
    assert any(type(m).__name__.startswith("Quant") for m in pm.modules())
    slimtorch.save(pm, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", model=resnet)
    with torch.no_grad():
        assert torch.equal(back(calib[0]), pm(calib[0]))
    # the history alone shrinks a fresh base model to the same shapes
    from slimtorch.quant.prepare import META_ATTR
    fresh = replay(copy.deepcopy(resnet), getattr(pm, META_ATTR)["pruning"])
    assert sum(p.numel() for p in fresh.parameters()) == rec["params"]["after"]


def test_recover_lowers_distillation_loss(resnet, calib):
    """At lr 0.02 on 32 noise images this run blew up to NaN within 6 steps before the gradient
    was clipped (max_grad_norm); without clipping it is now a clear error, weights restored."""
    from slimtorch.prune.recover import RecoverConfig, apply, recovery_loss
    recipe = slimtorch.resolve_recipe("macs-0.5-magnitude")
    pm = slimtorch.prune(resnet, recipe, calib, self_check=False)
    cfg = RecoverConfig(steps=30, batch_size=16, lr=0.02)
    with torch.no_grad():
        before = recovery_loss(pm(calib[0]), resnet(calib[0]), cfg).item()
    stats = apply(pm, cfg, MethodContext(recipe, calib, 0, False, resnet, None, None))
    with torch.no_grad():
        after = recovery_loss(pm.eval()(calib[0]), resnet(calib[0]), cfg).item()
    assert stats["steps"] == 30 and stats["data"] == "calibration"
    assert after < before
    # unclipped, the same run diverges: an error naming the fix, the pruned weights untouched
    pm2 = slimtorch.prune(resnet, recipe, calib, self_check=False)
    w0 = {k: v.clone() for k, v in pm2.state_dict().items()}
    bad = RecoverConfig(steps=30, batch_size=16, lr=0.02, max_grad_norm=None)
    with pytest.raises(SlimtorchError, match=r"recover \(KD\) diverged at step \d+ of 30.*Lower lr"):
        apply(pm2, bad, MethodContext(recipe, calib, 0, False, resnet, None, None))
    assert all(torch.equal(v, w0[k]) for k, v in pm2.state_dict().items())


def test_onnx_export_of_pruned_model(resnet, calib, tmp_path):
    pytest.importorskip("onnxruntime")
    pm = slimtorch.prune(resnet, "macs-0.5-magnitude", calib, self_check=False)
    report = slimtorch.export_onnx(pm, tmp_path / "p.onnx", calib[0][:2], opset=17)
    assert report.max_abs_diff < 1e-3 if hasattr(report, "max_abs_diff") else True
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: calib[0].numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), pm(calib[0]), atol=1e-4)


def test_macs_count(resnet):
    x = torch.randn(1, 1, 28, 28)
    macs = count_macs(resnet, capture(resnet, x))
    # by hand: Σ over convs of H·W·C_out·C_in·k² (+ the classifier 64·10)
    want = 0
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            hw = {1: 28 * 28, 2: 14 * 14, 4: 7 * 7}
            want += m.out_channels * m.in_channels * m.kernel_size[0] ** 2 * (
                28 * 28 if m.out_channels == 16 else 14 * 14 if m.out_channels == 32 else 7 * 7)
            del hw
    want += 64 * 10
    assert macs == want


def test_rd_allocation_curves_are_the_pruned_models_distortion():
    """allocation: rd (prune/rd.py): each curve point is δ = mean_x ‖f(x) − f'(x)‖² of the
    model with that group's lowest chunks physically removed; the choice meets the target; the
    predicted distortion is Σ of the chosen levels' δ; the measured one is the pruned model's."""
    from types import SimpleNamespace

    from slimtorch.prune.method import PruneConfig, Target
    from slimtorch.prune.rd import rd_select
    from slimtorch.prune.select import chunks_of
    from slimtorch.prune.surgery import count_macs, layer_costs
    model = _realistic(Mixed(grouped=False))
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    graph = capture(model, batches[0])
    groups = dependency_groups(model, graph)
    scores = criteria.magnitude(model, groups, 2)
    cfg = PruneConfig(target=Target(macs=0.6), round_to=None, allocation="rd", rd_levels=20,
                      tolerance=0.06)  # one unit of this toy model is ~6 % of its MACs
    total = sum(p.numel() for p in model.parameters())
    ctx = SimpleNamespace(batches=batches)
    with torch.no_grad():
        ref = [model(b) for b in batches]

    def delta_of(units):
        pm = copy.deepcopy(model)
        shrink(pm, kept_indices(groups, set(units)))
        with torch.no_grad():
            return sum(((pm(b) - r) ** 2).sum().item() for b, r in zip(batches, ref)) / 24, pm

    pruned, rec = rd_select(model, groups, scores, layer_costs(model, graph), total, cfg, ctx,
                            set())
    assert rec["samples"] == 24 and rec["curves"]
    g, curve = next((g, c) for g, c in rec["curves"].items() if len(c) > 2)
    chunks = chunks_of(groups.groups[int(g)], scores, None, cfg.max_ratio)
    assert len(curve) == len(chunks) + 1 and curve["0"] == 0.0
    for removed, d in curve.items():
        units = [u for c in chunks for u in c][:int(removed)]
        assert d == pytest.approx(delta_of(units)[0], rel=1e-5, abs=1e-9)
    chosen = sum(rec["curves"][g][str(v["removed"])] for g, v in rec["levels"].items())
    assert rec["distortion_predicted"] == pytest.approx(chosen)
    measured, pm = delta_of(pruned)
    assert rec["distortion_measured"] == pytest.approx(measured, rel=1e-5)
    macs = count_macs(pm, capture(pm, batches[0])) / count_macs(model, graph)
    assert 0.6 - cfg.tolerance <= macs <= 0.6 and rec["ratio"] == pytest.approx(macs, abs=1e-3)
    # 3 measured levels per group: the levels between are interpolated, the target still met
    coarse = cfg.model_copy(update={"rd_levels": 3})
    _, rec3 = rd_select(model, groups, scores, layer_costs(model, graph), total, coarse, ctx,
                        set())
    assert all(len(c) <= 3 for c in rec3["curves"].values())
    assert 0.6 - cfg.tolerance <= rec3["ratio"] <= 0.6


def test_rd_shorthand_and_unreachable_target(resnet, calib):
    r = slimtorch.resolve_recipe("macs-0.5-taylor-rd-kd")
    assert r.methods[0].allocation == "rd" and r.methods[0].criterion == "taylor"
    assert handler_for(r.methods[1]).name == "recover"
    pm = slimtorch.prune(resnet, "macs-0.5-magnitude-rd", calib, self_check=False)
    sel = pruning_record(pm)["selection"]
    assert sel["allocation"] == "rd" and abs(pruning_record(pm)["macs"]["ratio"] - 0.5) <= 0.02
    bad = {"name": "p", "weights": None, "methods": [
        {"name": "prune", "target": {"macs": 0.05}, "allocation": "rd"}]}
    with pytest.raises(PruningError, match="cannot be met"):
        slimtorch.prune(resnet, bad, calib, self_check=False)


def test_cli_prune_writes_pruning_metrics(tmp_path, capsys):
    """``slimtorch prune``: metrics.json has params/MACs before and after and the score before
    recovery; a recipe without a prune method is a one-line error."""
    import json

    from slimtorch.cli import main
    out = tmp_path / "p"
    assert main(["prune", "--model", "zoo:resnet20", "--recipe", "macs-0.5-magnitude-kd",
                 "--calib-size", "64", "--train-size", "256", "--out", str(out),
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    pr = m["pruning"]
    assert abs(pr["macs"]["after"] / pr["macs"]["before"] - 0.5) <= 0.02
    assert pr["params"]["after"] < pr["params"]["before"] and pr["criterion"] == "magnitude"
    assert set(pr["before_recovery"]) >= {"top1", "top1_agreement"}
    assert "before recovery" in capsys.readouterr().out
    assert main(["prune", "--model", "zoo:resnet20", "--recipe", "w8a8", "--out",
                 str(tmp_path / "q")]) == 2
    assert "no prune method" in capsys.readouterr().err
