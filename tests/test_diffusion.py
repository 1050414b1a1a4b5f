"""Diffusion PTQ: samplers pinned to diffusers, PTQ4DM / Q-Diffusion calibration rules, shortcut
splitting, time-only layers, PTQD's estimator and correction, the offline metrics, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

import slimtorch  # noqa: E402
from slimtorch.diffusion.calibration import (calibration_set, pick_steps,  # noqa: E402
                                             time_only_layers)
from slimtorch.diffusion.schedule import (DDPMSchedule, ddim_step, ddpm_posterior,  # noqa: E402
                                          sample, timesteps_for)
from slimtorch.errors import DiffusionError, RecipeError  # noqa: E402
from slimtorch.recipe import DiffusionCalib, Recipe, resolve_recipe  # noqa: E402


class TinyEps(nn.Module):
    """A small (x, t) noise predictor with a time MLP and a concat-reading 1x1 conv."""

    sample_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t1, self.t2 = nn.Linear(16, 32), nn.Linear(32, 8)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.short = nn.Conv2d(16, 1, 1)
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t):
        self.calls.append(t.clone())
        freqs = torch.exp(-math.log(1000) * torch.arange(8) / 8)  # [8]
        e = t.float()[:, None] * freqs[None]  # [B, 8]
        emb = self.t2(torch.relu(self.t1(torch.cat([e.sin(), e.cos()], 1))))  # [B, 8]
        h = torch.relu(self.c1(x)) + emb[:, :, None, None]
        h2 = self.c2(torch.relu(h))
        return self.short(torch.cat([h, h2], 1))


def _ddpm_unet():
    from slimtorch.zoo.ddpm import DDPMUNet
    torch.manual_seed(0)
    return DDPMUNet().eval()


# ---------------------------------------------------------------- samplers vs diffusers
def test_ddim_timesteps_and_step_match_diffusers():
    sch = DDPMSchedule()
    ref = sch.scheduler(diffusers.DDIMScheduler)
    ref.set_timesteps(50)
    ts = timesteps_for("ddim", 50, sch)
    assert ts == ref.timesteps.tolist()
    abar = sch.alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    for k in (0, 10, 49):
        eps = torch.randn(4, 1, 8, 8, generator=gen) * 1.5  # large: the x0 clip matters
        t = ts[k]
        prev = float(abar[ts[k + 1]]) if k + 1 < len(ts) else 1.0
        for clipped in (True, False):
            ours = ddim_step(x, eps, float(abar[t]), prev, True, clipped_eps=clipped)
            theirs = ref.step(eps, t, x, eta=0.0, use_clipped_model_output=clipped).prev_sample
            assert torch.allclose(ours, theirs, atol=1e-5), (k, clipped,
                                                             (ours - theirs).abs().max())
        if k == 0:  # the two variants differ where x0 was clipped
            assert not torch.allclose(ddim_step(x, eps, float(abar[t]), prev, True, True),
                                      ddim_step(x, eps, float(abar[t]), prev, True, False))


def test_ddpm_step_matches_diffusers():
    sch = DDPMSchedule()
    ref = sch.scheduler(diffusers.DDPMScheduler)
    ref.set_timesteps(1000)
    abar, betas = sch.alphas_cumprod(), sch.betas()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (999, 500, 1, 0):
        mean, var = ddpm_posterior(x, eps, t, abar, betas, True)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        ours = mean + var ** 0.5 * z if t > 0 else mean
        theirs = ref.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        assert torch.allclose(ours, theirs, atol=2e-4), t  # diffusers: float32 coefficients


def test_sampling_is_paired_by_sample_index():
    m = TinyEps().eval()
    a = sample(m, 6, steps=5, seed=3, shape=(1, 8, 8), batch_size=4)
    b = sample(m, 6, steps=5, seed=3, shape=(1, 8, 8), batch_size=6)
    assert torch.allclose(a, b, atol=1e-6)  # noise depends on (seed, index) only
    # the network sees the true time steps, never respaced indices
    assert sorted({int(t[0]) for t in m.calls}) == sorted(timesteps_for("ddim", 5, DDPMSchedule()))


# ---------------------------------------------------------------- time-step rules
def test_ptq4dm_rule_is_clamped_normal_snapped_to_the_grid():
    visited = timesteps_for("ddim", 50, DDPMSchedule())  # 980, 960, ..., 0
    n = 40000
    k = pick_steps("ptq4dm", visited, n, torch.Generator().manual_seed(0))
    t = torch.tensor([visited[i] for i in k], dtype=torch.float64)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    # t = clamp(floor(N(0.4, 0.4) * 1000)) then nearest grid point: t < 10 -> 0, t >= 970 -> 980
    assert abs((t == 0).double().mean() - phi((10 / 1000 - 0.4) / 0.4)) < 0.01
    assert abs((t == 980).double().mean() - (1 - phi((970 / 1000 - 0.4) / 0.4))) < 0.01
    assert abs(t.median() - 400) <= 20


def test_uniform_rule_every_fifth_step_balanced():
    visited = timesteps_for("ddim", 50, DDPMSchedule())
    k = pick_steps("uniform", visited, 100, torch.Generator().manual_seed(0))
    assert sorted(set(k)) == list(range(0, 50, 5))
    assert all(k.count(i) == 10 for i in set(k))
    single = pick_steps("single", visited, 30, torch.Generator().manual_seed(0))
    assert len(set(single)) == 1


def test_calibration_pairs_lie_on_the_float_trajectory():
    m = TinyEps().eval()
    cfg = DiffusionCalib(timesteps="uniform", steps=10, every=2)
    pairs = calibration_set(m, cfg, 20, 8, seed=0)
    x = torch.cat([p[0] for p in pairs])
    t = torch.cat([p[1] for p in pairs])
    assert x.shape == (20, 1, 8, 8) and sorted(set(t.tolist())) == [100, 300, 500, 700, 900]
    # rerun the trajectory and find each pair's x_t at its t
    seen = {}
    sample(m, 20, steps=10, seed=17, shape=(1, 8, 8), batch_size=100,
           record=lambda s, tt, xb: seen.update({(s + j, tt): xb[j].clone()
                                                 for j in range(xb.shape[0])}))
    for i in range(20):
        assert any(torch.equal(x[i], v) for (j, tt), v in seen.items() if tt == int(t[i]))


# ---------------------------------------------------------------- recipes and errors
def test_diffusion_recipe_errors():
    base = resolve_recipe("w8a8-ptq4dm").to_dict()
    base["calib"]["diffusion"]["steps"] = 2000
    with pytest.raises(RecipeError, match="more than the schedule"):
        Recipe.from_dict(base)
    base = resolve_recipe("w8a8").to_dict()
    base["calib"] = {"diffusion": {"timesteps": "ptq4dm"}}
    with pytest.raises(RecipeError, match="source: diffusion"):
        Recipe.from_dict(base)
    from slimtorch.zoo.models import ResNet20
    with pytest.raises(DiffusionError, match=r"model\(x_t, t\)"):
        slimtorch.quantize(ResNet20(), "w8a8-ptq4dm")


@pytest.mark.parametrize("name", ["w8a8-diffusion-rtn", "w4a8-ptq4dm", "w4a8-qdiffusion",
                                  "w4a8-qdiffusion-ptqd", "w4a4-qdiffusion"])
def test_shipped_diffusion_recipes_round_trip(name):
    r = resolve_recipe(name)
    assert r.calib.source == "diffusion"
    assert Recipe.from_dict(r.to_dict()) == r


# ---------------------------------------------------------------- shortcut split, time layers
def test_split_concat_is_exact_and_gets_own_quantizers():
    m = TinyEps().eval()
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,))
    r = resolve_recipe("w8a8").to_dict()
    r["split_concat"] = True
    q = slimtorch.quantize(m, Recipe.from_dict(r), [(x, t)], self_check=False)
    # both layers that read a channel concatenation: the time MLP's input [sin, cos] and the
    # shortcut conv reading cat(h, h2)
    assert q._slimtorch_meta["split_concat"] == [{"fqn": "t1", "sizes": [8, 8]},
                                                 {"fqn": "short", "sizes": [8, 8]}]
    parts = q.short.parts
    assert [p.in_channels for p in parts] == [8, 8] and parts[1].bias is None
    s0, s1 = (float(p.input_quantizer.scale) for p in parts)
    assert s0 != s1  # one activation range per concatenated part
    from slimtorch.graph.split_concat import ConcatSplit
    conv = TinyEps().short
    split = ConcatSplit(conv, [8, 8])
    z = torch.randn(2, 16, 8, 8)
    assert torch.allclose(split(z), conv(z), atol=1e-6)
    slimtorch.save(q, "/tmp/_st_split")
    q2 = slimtorch.load("/tmp/_st_split", model=m)
    with torch.no_grad():
        assert torch.equal(q(x, t), q2(x, t))


def test_time_only_layers_found_and_calibrated_over_all_steps():
    from slimtorch.graph.capture import capture
    m = _ddpm_unet()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([10, 20, 30, 40])
    names = time_only_layers(capture(m, (x, t)))
    assert "unet.time_embedding.linear_1" in names and "unet.time_embedding.linear_2" in names
    assert sum("time_emb_proj" in n for n in names) == 17  # 6 down, 2 mid, 9 up
    assert not any("conv" in n for n in names)
    r = resolve_recipe("w8a8-ptq4dm").to_dict()
    r["calib"]["samples"], r["calib"]["diffusion"]["steps"] = 8, 4
    r["activations"]["observer"] = "minmax"
    q = slimtorch.quantize(m, Recipe.from_dict(r), self_check=False)
    assert "unet.time_embedding.linear_1" in q._slimtorch_meta["calibration"]["time_layers"]
    qz = q.unet.time_embedding.linear_1.input_quantizer
    lo = -float(qz.scale * qz.zero_point)
    hi = float(qz.scale * (255 - qz.zero_point))
    # sinusoidal embedding over all t spans [-1, 1], not just the 4 calibrated steps
    assert lo <= -0.99 and hi >= 0.99


# ---------------------------------------------------------------- PTQD
class _Distorted(nn.Module):
    def __init__(self, base, k, mu):
        super().__init__()
        self.base, self.k, self.mu = base, k, mu

    def forward(self, x, t):
        e = self.base(x, t)
        return (1 + self.k) * e + self.mu + 0.01 * torch.sin(37 * x)


def test_ptqd_estimates_k_mu_and_corrects():
    from slimtorch.algorithms.ptqd import PTQDConfig, apply
    from slimtorch.diffusion.ptqd import hooks
    from slimtorch.methods import MethodContext
    base = TinyEps().eval()
    q = _Distorted(base, 0.2, 0.05)
    x = torch.randn(64, 1, 8, 8)
    t = torch.tensor([100] * 32 + [700] * 32)
    recipe = resolve_recipe("w8a8-qdiffusion-ptqd")
    ctx = MethodContext(recipe, [(x[:32], t[:32]), (x[32:], t[32:])], float_model=base)
    st = apply(q, PTQDConfig(), ctx)
    assert st["t"] == [100, 700]
    assert all(abs(k - 0.2) < 0.02 for k in st["k"])
    assert all(abs(m[0] - 0.05) < 0.01 for m in st["mu"])
    eps_hook, var_hook = hooks(st, DDPMSchedule())
    with torch.no_grad():
        fixed = eps_hook(400, x[:4], q(x[:4], t[:4]))
        err_before = (q(x[:4], t[:4]) - base(x[:4], t[:4])).pow(2).mean()
        err_after = (fixed - base(x[:4], t[:4])).pow(2).mean()
    assert err_after < 0.1 * err_before
    # variance absorption: sigma^2 - c_t^2 var / (1 + k)^2, c_t = beta / (sqrt(alpha) sqrt(1 - abar))
    sch = DDPMSchedule()
    b, ab = float(sch.betas()[700]), float(sch.alphas_cumprod()[700])
    c = b / (math.sqrt(1 - b) * math.sqrt(1 - ab))
    k700, v700 = st["k"][1], st["var"][1]
    assert var_hook(700, 1.0) == pytest.approx(1.0 - c * c * v700 / (1 + k700) ** 2)
    assert var_hook(700, 0.0) == 0.0


def test_ptqd_needs_diffusion_calibration():
    from slimtorch.zoo.models import ResNet20
    r = resolve_recipe("w8a8").to_dict()
    r["methods"] = ["rtn", "ptqd"]
    with pytest.raises(DiffusionError, match="source: diffusion"):
        slimtorch.quantize(ResNet20(), Recipe.from_dict(r), torch.randn(8, 1, 28, 28))


# ---------------------------------------------------------------- block units with time input
def test_brecq_reconstructs_unet_blocks_with_time_embedding():
    m = _ddpm_unet()
    r = resolve_recipe("w4a8-qdiffusion").to_dict()
    r["methods"] = [{"name": "brecq", "iters": 30, "act_iters": 0}]
    r["calib"]["samples"], r["calib"]["diffusion"]["steps"] = 32, 10
    r["calib"]["diffusion"]["every"] = 2
    q = slimtorch.quantize(m, Recipe.from_dict(r), self_check=False)
    st = q._slimtorch_meta["methods"][0]["stats"]
    kinds = {u["name"]: u["kind"] for u in st["units"]}
    assert kinds["unet.down_blocks.0.resnets.0"] == "block"  # reads (h, temb): packed
    assert kinds["unet.up_blocks.0.resnets.0"] == "block"
    per = [u for u in st["per_unit"] if u["kind"] == "block"]
    assert sum(u["loss_after"] for u in per) < sum(u["loss_before"] for u in per)


# ---------------------------------------------------------------- metrics
def test_knn_precision_recall_and_fd():
    from slimtorch.diffusion.metrics import knn_precision_recall
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=gen)
    p, r = knn_precision_recall(a, a.clone())
    assert p == 1.0 and r == 1.0
    far = torch.randn(500, 8, generator=gen) + 10
    p, r = knn_precision_recall(a, far)
    assert p == 0.0 and r == 0.0
    half = torch.cat([a[:250] + 1e-4, far[:250]])  # half on the real manifold
    p, _ = knn_precision_recall(a, half)
    assert abs(p - 0.5) < 0.02


def test_sample_scores_are_deterministic():
    """KID's subsets and IS's splits draw random numbers: one seed, one score."""
    from slimtorch.diffusion.metrics import score_samples
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(1)
    a = score_samples(x, reference=x.flip(0))
    torch.manual_seed(2)
    b = score_samples(x, reference=x.flip(0))
    assert a == b and a["n"] == 64 and a["mse_to_float"] > 0
    assert score_samples(x, seed=1)["kid"] != a["kid"]


# ---------------------------------------------------------------- end to end on zoo:ddpm
def _trained():
    from slimtorch.zoo.registry import weights_path
    return weights_path("ddpm").is_file()


@pytest.mark.skipif(not _trained(), reason="zoo:ddpm not trained")
def test_cli_quantize_sample_and_reload(tmp_path, capsys):
    import json

    from slimtorch.cli import main
    out = tmp_path / "ddpm"
    assert main(["quantize", "--model", "zoo:ddpm", "--recipe", "w8a8-ptq4dm", "--calib-size",
                 "64", "--eval-size", "32", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["calib_source"] == "diffusion" and m["calib_size"] == 64
    assert m["methods"][0]["name"] == "rtn"
    # W8A8 with PTQ4DM calibration stays close to the float model's own samples
    assert m["q_mse_to_float"] < 0.05 and m["q_fd"] < 2 * m["fp_fd"] + 1
    # the float samples over the quantized ones from the same noise, shown by the report
    from PIL import Image

    from slimtorch.eval.report import report
    assert m["files"] == ["samples.png"]
    grid = Image.open(out / "samples.png")
    assert grid.size == (16 * 29 + 1, 2 * 29 + 1)  # 16 pairs of 28 px images, 1 px padding
    html, md = report([out], tmp_path / "r.html")
    text = md.read_text()
    assert "## Samples (diffusion)" in text and "FD on resnet20 features" in text
    assert f"| {m['fp_fd']:.3f} | {m['q_fd']:.3f} |" in text
    assert f"{m['fp_fd']:.2f} → {m['q_fd']:.2f}" in text  # the summary's headline metric
    assert "data:image/png;base64," in html.read_text()
    png = tmp_path / "grid.png"
    assert main(["sample", str(out), "--n", "4", "--steps", "10", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = slimtorch.load(out)
    a = sample(q, 4, steps=10, seed=5)
    b = sample(q, 4, steps=10, seed=5)
    assert torch.equal(a, b) and a.abs().max() <= 1.0
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "grid.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert not (tmp_path / "grid.jpg").exists()
