"""Reconstruction PTQ: formulas of AdaRound/BRECQ/QDrop/PD-Quant, unit partition, mechanics."""
import json

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.runner import recon, recon_cache
from slimtorch.runner.units import partition
from slimtorch.data.cache import CachePool
from slimtorch.algorithms.pd import PDSettings, bn_stat_loss, correct, dc_objective, pd_loss
from slimtorch.errors import RecipeError
from slimtorch.quant.quantizer import Quantizer
from slimtorch.runner.learned import LSQ, AdaRound, rectified_sigmoid, rectified_sigmoid_inverse
from slimtorch.recipe import QuantSpec, load_builtin


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


class Block(nn.Module):
    def __init__(self, c, stride=1, c_out=None):
        super().__init__()
        c_out = c_out or c
        self.conv1, self.bn1 = nn.Conv2d(c, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.short = (nn.Identity() if stride == 1 and c == c_out else
                      nn.Sequential(nn.Conv2d(c, c_out, 1, stride, bias=False),
                                    nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b1, self.b2 = Block(8), Block(8, 2, 16)
        self.head = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.head(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def trained():
    """A ResCNN whose BN statistics come from data (a 'trained-ish' float model)."""
    torch.manual_seed(0)
    m = ResCNN().train()
    x = torch.randn(192, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(3):
            m(x)
    return m.eval(), x


# ------------------------------------------------------------------ formulas
def test_rectified_sigmoid_and_init_give_fractional_part():
    assert rectified_sigmoid(torch.tensor([-100.0, 0.0, 100.0])).tolist() == [0.0, 0.5, 1.0]
    v = torch.randn(1000)
    expect = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)
    assert torch.equal(rectified_sigmoid(v), expect)
    frac = torch.rand(1000) * 0.999
    assert torch.allclose(rectified_sigmoid(rectified_sigmoid_inverse(frac)), frac, atol=1e-5)
    # a quantizer with AdaRound attached starts exactly at the float weight inside the range
    w = torch.randn(6, 3, 3, 3) * 0.1
    q = Quantizer(QuantSpec(bits=4, granularity="per_channel"))
    q.calibrate(w)
    r = AdaRound(q, w)
    x = w / q.scale
    assert q.learner is r and torch.allclose(r.h(), x - torch.floor(x), atol=1e-5)
    inside = ((torch.floor(x) + q.zero_point >= 0) & (torch.floor(x) + 1 + q.zero_point <= 15))
    assert torch.allclose(q.fake_quant(w)[inside], w[inside], atol=1e-6)


def test_hard_rounding_commits_exact_codes():
    w = torch.randn(4, 8)
    q = Quantizer(QuantSpec(bits=2, granularity="per_channel"))
    q.calibrate(w)
    r = AdaRound(q, w)
    with torch.no_grad():
        r.v.copy_(torch.randn_like(w))
    r.hard = True
    soft_codes = torch.floor(w / q.scale) + (r.v >= 0).float() + q.zero_point
    expect = (soft_codes.clamp(0, 3) - q.zero_point) * q.scale
    assert torch.equal(q.fake_quant(w), expect)
    w_new = r.commit(w)
    assert q.learner is None and dict(q.named_parameters()) == {}  # nothing left in the core
    assert torch.equal(q.quantize_int(w_new).float(), soft_codes.clamp(0, 3))


def test_lsq_step_gets_the_scaled_gradient_and_is_written_back():
    """LSQ: ∂x̂/∂s = ⌊x/s⌉ − x/s inside the grid, the clipped code outside, times 1/√(N·q_max).
    (Values that round onto q_min or q_max themselves get 0 for the inside part: the clamp after
    the rounding, which the LSQ code puts before it; the test keeps clear of those codes.)"""
    q = Quantizer(QuantSpec(bits=4))
    q.scale = torch.tensor(0.5)
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randint(1, 15, (48,), generator=g) + torch.rand(48, generator=g) * 0.8
                   - 0.4, torch.tensor([-9.0, -3.0, 20.0, 31.0])])  # x/s: inside, then outside
    s = LSQ(q)
    q.fake_quant(v * 0.5).sum().backward()
    r = v.round()
    expect = torch.where((r >= 0) & (r <= 15), r - v, r.clamp(0, 15)).sum() / (52 * 15) ** 0.5
    assert torch.allclose(s.scale.grad, expect, atol=1e-5)
    with torch.no_grad():
        s.scale.fill_(-0.25)
    s.finish()
    assert q.learner is None and q.scale.item() == 0.25


def test_round_regulariser_and_beta_schedule():
    q = Quantizer(QuantSpec(bits=4))
    q.scale = torch.tensor(1.0)
    r = AdaRound(q, torch.tensor([0.0, 0.25, 0.5, 0.999]))
    h = rectified_sigmoid(r.v)
    for beta in (20.0, 2.0):
        assert torch.allclose(r.regularizer(beta), (1 - (2 * h - 1).abs() ** beta).sum())
    assert r.regularizer(2.0).item() == pytest.approx(0 + 0.75 + 1 + 0.004, abs=1e-2)
    it = 1000
    assert recon.beta_at(0, it, 0.2, (20, 2)) is None
    assert recon.beta_at(199, it, 0.2, (20, 2)) is None
    assert recon.beta_at(200, it, 0.2, (20, 2)) == 20
    assert recon.beta_at(600, it, 0.2, (20, 2)) == pytest.approx(11)
    assert recon.beta_at(1000, it, 0.2, (20, 2)) == pytest.approx(2)


def test_qdrop_mix_and_drop_probability():
    g = torch.Generator().manual_seed(0)
    xq, xf = torch.ones(100_000), torch.zeros(100_000)
    x, mask = recon.mix_inputs(xq, xf, 0.5, g)
    assert abs(x.mean().item() - 0.5) < 0.01 and torch.equal(x, mask.float())
    q = Quantizer(QuantSpec(bits=2))
    q.scale, q.zero_point, q.mode = torch.tensor(1.0), torch.tensor(0.0), q.mode.QUANT
    v = torch.full((100_000,), 0.4)  # quantizes to 0
    drop = recon.QDrop([q], [q], 0.5, torch.Generator().manual_seed(0))
    rng = torch.random.get_rng_state()
    assert abs((q(v) == 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(torch.random.get_rng_state(), rng)  # its own generator
    drop.mask = mask  # the mix mask decides for a quantizer reading the unit input
    assert torch.equal(q(v) == 0, mask)
    drop.remove()
    assert (q(v) == 0).all()


def test_pd_loss_is_batchmean_kl_of_tempered_softmax():
    zf, zq = torch.randn(8, 10), torch.randn(8, 10)
    p, T = torch.softmax(zf / 4, 1), 4.0
    expect = (p * (p.log() - torch.log_softmax(zq / T, 1))).sum() / 8
    assert pd_loss(zq, zf, T).item() == pytest.approx(expect.item(), rel=1e-5)
    assert pd_loss(zf, zf, T).abs().item() < 1e-6


def test_dc_objective_and_correction():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    x = torch.randn(5, 3, 6, 6)
    m = x.mean((2, 3))
    s = torch.sqrt(x.var((2, 3), unbiased=False) + bn.eps)
    sigma = torch.sqrt(bn.running_var + bn.eps)
    expect = ((bn.running_mean - m) ** 2).sum(1).mean() + ((sigma - s) ** 2).sum(1).mean()
    assert bn_stat_loss(x, bn).item() == pytest.approx(expect.item(), rel=1e-5)
    x0 = x + 0.1
    assert dc_objective(x, x0, [(x, bn)], 0.02).item() == pytest.approx(
        expect.item() + 0.01 * 3 / 0.02, rel=1e-4)
    conv = nn.Conv2d(3, 3, 1)
    x_star, before, after = correct(nn.Sequential(conv, bn), [bn], x, PDSettings(dc_steps=50))
    assert after < before and not torch.equal(x_star, x)


# ------------------------------------------------------------------ partition
def test_units_from_graph(trained):
    from slimtorch.quant.prepare import prepare
    import copy
    m, x = trained
    q = copy.deepcopy(m)
    prepare(q, load_builtin("w4a4"), x[:8])
    units = partition(q, x[:8])
    assert [(u.name, u.kind, len(u.layers)) for u in units] == [
        ("stem", "group", 1), ("b1", "block", 2), ("b2", "block", 3), ("head", "group", 1),
        ("fc", "layer", 1)]
    layer_units = partition(q, x[:8], blocks=False, max_group=1)
    assert [u.name for u in layer_units] == [
        "stem.0", "b1.conv1", "b1.conv2", "b2.conv1", "b2.conv2", "b2.short.0", "head.0", "fc"]


def test_units_of_zoo_resnet20():
    from slimtorch.quant.prepare import prepare
    from slimtorch.zoo.models import ResNet20
    m = ResNet20().eval()
    x = torch.randn(2, 1, 28, 28)
    prepare(m, load_builtin("w4a4"), x)
    units = partition(m, x)
    assert len(units) == 11 and units[0].layers == ["stem.0"] and units[-1].layers == ["fc"]
    assert all(u.kind == "block" for u in units[1:-1])


def test_conftest_block_without_module_falls_back_to_layers(cnn, images):
    from slimtorch.quant.prepare import prepare
    prepare(cnn, load_builtin("w4a4"), images[:4])
    assert [u.name for u in partition(cnn, images[:4])] == ["stem", "conv1", "conv2", "fc"]


# ------------------------------------------------------------------ mechanics
def _run(model, x, method, bits="w2a4", **args):
    recipe = dict(load_builtin(bits).to_dict(), methods=[{"name": method, **args}])
    return slimtorch.quantize(model, recipe, x[:128], seed=0)


@pytest.mark.parametrize("method,args", [
    ("adaround", {"iters": 300}),
    ("brecq", {"iters": 300, "act_iters": 100}),
    ("qdrop", {"iters": 300}),
    ("pdquant", {"iters": 300, "dc_steps": 20}),
])
def test_reconstruction_beats_rtn(trained, method, args):
    m, x = trained
    test = x[128:]
    with torch.no_grad():
        ref = m(test)
        rtn_err = (_run(m, x, "rtn")(test) - ref).square().mean().item()
        q = _run(m, x, method, **args)
        err = (q(test) - ref).square().mean().item()
    stats = q._slimtorch_meta["methods"][0]["stats"]["per_unit"]
    blocks = [s for s in stats if s["layers"] > 1 or method == "adaround"]
    assert sum(s["loss_after"] for s in blocks) < 0.85 * sum(s["loss_before"] for s in blocks)
    assert err < 0.8 * rtn_err, (method, err, rtn_err)
    # frozen codes are integers on the grid, and reload is bit-exact
    assert all(torch.equal(l.weight_int.float(), l.weight_int.float().round())
               for l in q.modules() if hasattr(l, "weight_int"))


def test_deterministic_and_resumable(trained, tmp_path):
    m, x = trained
    a = _run(m, x, "qdrop", iters=60)
    b = slimtorch.quantize(m, dict(load_builtin("w2a4").to_dict(),
                                   methods=[{"name": "qdrop", "iters": 60}]), x[:128], seed=0,
                           work_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "0-qdrop").glob("*.safetensors"))
    assert files == [f"joint-{k}.safetensors" for k in range(5)]
    (tmp_path / "0-qdrop" / "joint-4.safetensors").unlink()  # "crash" before the last unit
    c = slimtorch.quantize(m, dict(load_builtin("w2a4").to_dict(),
                                   methods=[{"name": "qdrop", "iters": 60}]), x[:128], seed=0,
                           work_dir=tmp_path)
    resumed = [s.get("resumed", False) for s in c._slimtorch_meta["methods"][0]["stats"]["per_unit"]]
    assert resumed == [True] * 4 + [False]
    slimtorch.save(c, tmp_path / "art")
    r = slimtorch.load(tmp_path / "art", model=ResCNN())
    with torch.no_grad():
        assert torch.equal(r(x[128:]), a(x[128:]))  # artifact format unchanged, bit-exact
    for q in (b, c):
        for (n, t), (_, u) in zip(a.state_dict().items(), q.state_dict().items()):
            assert torch.equal(t, u), n
        for (n, l), (_, k) in zip(a.named_modules(), q.named_modules()):
            if hasattr(l, "weight_int"):
                assert torch.equal(l.weight_int, k.weight_int), n


def test_unit_state_is_never_half_written(tmp_path, monkeypatch):
    """A crash while a unit's state is saved leaves no .safetensors (the file that marks the
    unit done), so --resume redoes that unit instead of failing on a truncated file."""
    work = recon_cache.WorkDir(tmp_path, "fp")
    work.save("joint", 0, {"a": torch.ones(3)}, {"loss": 1.0})

    def crash(tensors, filename):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(recon_cache, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        work.save("joint", 1, {"a": torch.ones(3)}, {"loss": 2.0})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["joint-0.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    assert work.load("joint", 1) is None and work.load("joint", 0)[1] == {"loss": 1.0}


def test_method_settings_are_validated():
    with pytest.raises(RecipeError, match=r"methods\[0\] \(qdrop\): unknown key 'iterz'"):
        slimtorch.quantize(nn.Linear(2, 2), dict(load_builtin("w4a4").to_dict(),
                           methods=[{"name": "qdrop", "iterz": 1}]), torch.randn(4, 2))


def test_workdir_of_another_run_is_an_error(trained, tmp_path):
    m, x = trained
    recipe = dict(load_builtin("w2a4").to_dict(), methods=[{"name": "qdrop", "iters": 5}])
    slimtorch.quantize(m, recipe, x[:64], seed=0, work_dir=tmp_path)
    with pytest.raises(ValueError, match="different run"):
        slimtorch.quantize(m, recipe, x[:64], seed=1, work_dir=tmp_path)


def test_cli_refuses_stale_state_without_resume(tmp_path, capsys):
    from slimtorch.cli import main
    (tmp_path / "out" / "recon-state").mkdir(parents=True)
    code = main(["quantize", "--model", "zoo:resnet20", "--recipe", "w2a2-qdrop", "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "interrupted run" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------ PD-Quant suffix cache
class LongSkip(nn.Module):
    """The stem output is read again after the blocks: the prefix cannot be skipped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU())
        self.b1, self.b2 = Block(8), Block(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        s = self.stem(x)
        return self.fc((self.b2(self.b1(s)) + s).mean((2, 3)))


@pytest.mark.parametrize("model_cls,skips", [(ResCNN, True), (LongSkip, False)])
def test_suffix_cache_equals_recompute(trained, model_cls, skips):
    from slimtorch.algorithms.suffix import SuffixRunner
    from slimtorch.quant.prepare import calibrate, prepare
    x = trained[1][:32]
    torch.manual_seed(0)
    m = model_cls().eval()
    prepare(m, load_builtin("w4a4"), x)
    calibrate(m, [x])
    for unit in partition(m, x)[1:]:
        mod = m.get_submodule(unit.name)
        with torch.no_grad():
            out = mod(recon_cache.collect(m, mod, [x], CachePool(1 << 30), False)[0])
        run = SuffixRunner(m, mod, x, out)
        # the classifier's output is the logits: nothing after it reads the prefix
        assert run.mode.startswith("skip prefix") == (skips or unit.name == "fc"), unit.name
        assert run.mode.startswith("skip prefix") or run.mode == "recompute"
        noisy = out + torch.randn_like(out)  # a different unit output each step
        assert torch.equal(run(noisy, x), run.recompute(noisy, x))
        if unit.name == "fc":
            assert torch.equal(run(noisy, x), noisy)


def test_pdquant_same_seed_same_artifact(trained, tmp_path):
    m, x = trained
    recipe = dict(load_builtin("w2a2").to_dict(),
                  methods=[{"name": "pdquant", "iters": 20, "dc_steps": 3}])
    for d in ("a", "b"):
        slimtorch.save(slimtorch.quantize(m, recipe, x[:64], seed=3), tmp_path / d)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    for f in files:
        a, b = ((tmp_path / d / f).read_bytes() for d in "ab")
        if f.endswith(".json"):  # identical except the wall-clock timings it records
            a, b = (_no_timings(json.loads(t)) for t in (a, b))
        assert a == b, f


def _no_timings(d):
    if isinstance(d, dict):
        return {k: _no_timings(v) for k, v in d.items() if not k.endswith("seconds")}
    return [_no_timings(v) for v in d] if isinstance(d, list) else d


def test_mobilenet_style_settings_come_from_depthwise_convs():
    """Published MobileNetV2 runs: λ = 0.1, T = 1, λ_c = 0.005; ResNets: 0.01, 4, 0.02. The rule
    is 'the model has a depthwise conv' (groups == in_channels > 1), not a class name."""
    from slimtorch.algorithms.pdquant import PDQuantConfig
    from slimtorch.zoo.registry import load_zoo_model
    cfg = PDQuantConfig.parse({}, "pdquant")
    dw = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2))  # not depthwise
    for model, lam, t, lc in ((dw, 0.1, 1.0, 0.005), (grouped, 0.01, 4.0, 0.02),
                              (load_zoo_model("mobilenetv2", pretrained=False), 0.1, 1.0, 0.005),
                              (load_zoo_model("resnet20", pretrained=False), 0.01, 4.0, 0.02)):
        st = cfg.joint_stage(model, terms=(cfg.term(model),))
        pd = st.terms[0].pd
        assert (st.round_weight, pd.temperature, pd.lambda_c) == (lam, t, lc)
    fixed = PDQuantConfig.parse({"round_weight": 0.3, "temperature": 2, "lambda_c": 1}, "pdquant")
    st = fixed.joint_stage(dw, terms=(fixed.term(dw),))
    pd = st.terms[0].pd
    assert (st.round_weight, pd.temperature, pd.lambda_c) == (0.3, 2.0, 1.0)


def test_auto_act_lr_keeps_the_published_lsq_step_budget():
    """act_lr auto: lr × iters = 4e-5 × 20 000 (the published QDrop/PD-Quant LSQ schedule)."""
    from slimtorch.algorithms.pdquant import PDQuantConfig
    from slimtorch.algorithms.qdrop import QDropConfig
    m = nn.Linear(2, 2)
    for cls in (QDropConfig, PDQuantConfig):
        assert cls.parse({"iters": 20000}, "x").joint_stage(m).lr_act == pytest.approx(4e-5)
        assert cls.parse({}, "x").joint_stage(m).lr_act == pytest.approx(4e-3)  # 200 iters
        assert cls.parse({"iters": 800}, "x").joint_stage(m).lr_act == pytest.approx(1e-3)
        assert cls.parse({"iters": 20}, "x").joint_stage(m).lr_act == pytest.approx(4e-3)  # cap
        assert cls.parse({"act_lr": 2e-5}, "x").joint_stage(m).lr_act == 2e-5
        # above 4-bit activations auto is the published rate (6/8-bit steps start right)
        for bits, lr in ((2, 4e-3), (4, 4e-3), (None, 4e-3), (6, 4e-5), (8, 4e-5)):
            assert cls.parse({}, "x").joint_stage(m, bits).lr_act == pytest.approx(lr)
        assert cls.parse({"act_lr": 1e-3}, "x").joint_stage(m, 8).lr_act == 1e-3
    with pytest.raises(RecipeError, match="act_lr"):
        QDropConfig.parse({"act_lr": 0}, "qdrop")


@pytest.mark.parametrize("method", ["qdrop", "pdquant"])
def test_recipes_give_the_stage_their_activation_bits(method, monkeypatch):
    """apply() passes the recipe's activation bits to act_lr auto (w8a8-M: 4e-5, w4a4-M: 4e-3),
    and resolving the config gives the same value."""
    import importlib
    from slimtorch.methods import MethodContext
    mod = importlib.import_module(f"slimtorch.algorithms.{method}")
    seen = {}
    monkeypatch.setattr(recon, "run_stages", lambda m, ctx, stages, **kw: seen.update(
        {ctx.recipe.name: stages[0].lr_act}))
    for name in (f"w8a8-{method}", f"w4a4-{method}", f"w4a2-{method}"):
        r = load_builtin(name)
        ctx = MethodContext(r, [torch.randn(4, 2)])
        mod.apply(nn.Linear(2, 2), r.methods[0], ctx)
        assert r.methods[0].resolve(nn.Linear(2, 2), ctx).act_lr == pytest.approx(seen[name])
    assert seen == pytest.approx({f"w8a8-{method}": 4e-5, f"w4a4-{method}": 4e-3,
                                  f"w4a2-{method}": 4e-3})


def test_auto_round_lr_is_published_rate_floored_at_two_over_iters():
    """lr auto: the published Adam lr of V (1e-3; PD-Quant 3e-3) unless iters is too short for V
    to travel 2 (lr × iters), e.g. 1e-2 at the 200-iteration CPU default, and never above that
    for shorter runs."""
    from slimtorch.algorithms.adaround import AdaRoundConfig
    from slimtorch.algorithms.brecq import BRECQConfig
    from slimtorch.algorithms.pdquant import PDQuantConfig
    from slimtorch.algorithms.qdrop import QDropConfig
    m = nn.Linear(2, 2)
    for cls, paper in ((AdaRoundConfig, 1e-3), (BRECQConfig, 1e-3), (QDropConfig, 1e-3),
                       (PDQuantConfig, 3e-3)):
        stage = (cls.parse({}, "x").joint_stage(m) if hasattr(cls, "joint_stage")
                 else cls.parse({}, "x").weight_stage())
        assert stage.lr_round == pytest.approx(1e-2)  # 2 / 200
        for it in (20000, 5000):
            assert cls.parse({"iters": it}, "x").round_lr() == pytest.approx(paper)
        assert cls.parse({"iters": 1000}, "x").round_lr() == pytest.approx(max(paper, 2e-3))
        assert cls.parse({"lr": 5e-4}, "x").round_lr() == 5e-4
        assert cls.parse({"iters": 20}, "x").round_lr() == pytest.approx(1e-2)  # capped



@pytest.mark.parametrize("method,args", [("qdrop", {"iters": 40}),
                                         ("pdquant", {"iters": 40, "dc_steps": 5}),
                                         ("brecq", {"iters": 30, "act_iters": 20})])
def test_carried_unit_inputs_equal_rerunning_the_prefix(trained, method, args, monkeypatch):
    """Inputs carried from the previous unit (its float output; the finished quantized unit
    on its quantized inputs) are what a rerun of the model prefix collects: same artifact."""
    import slimtorch.runner.recon as recon_mod
    m, x = trained
    a = _run(m, x, method, **args)
    per_unit = a._slimtorch_meta["methods"][0]["stats"]["per_unit"]
    assert [s["inputs"] for s in per_unit][:4] == ["collected", "carried", "carried", "carried"]
    monkeypatch.setattr(recon_mod, "chained", lambda model, units, ex: [False] * len(units))
    b = _run(m, x, method, **args)
    assert all(s["inputs"] == "collected"
               for s in b._slimtorch_meta["methods"][0]["stats"]["per_unit"])
    for (n, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t, u), n
