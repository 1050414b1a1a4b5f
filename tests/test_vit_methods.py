"""PTQ4ViT and RepQ-ViT: quantizer formulas, graph queries, the reparameterisation, the
Hessian-guided search, and both methods on timm DeiT/Swin and MiniLM (no per-model code)."""
from __future__ import annotations

import math

import pytest

from conftest import load_minilm_or_skip
import torch
from torch import nn

import slimtorch
from slimtorch.algorithms.ptq4vit import PTQ4ViTConfig, collect, search_quantizer
from slimtorch.algorithms.repq_vit import reparam_params, reparameterize
from slimtorch.algorithms.vit_sites import (ln_linear_groups, post_gelu_layers,
                                            post_softmax_slots, recapture)
from slimtorch.quant.prepare import quantizers_off
from slimtorch.quant.log2 import Log2Sqrt2Quantizer, log2sqrt2_quant
from slimtorch.quant.prepare import META_ATTR, calibrate, prepare
from slimtorch.quant.quantizer import Mode, fake_quant
from slimtorch.quant.reparam import ReparamQuantizer
from slimtorch.quant.twin import TwinUniformQuantizer
from slimtorch.recipe import QuantSpec, Recipe, load_builtin, load_recipe_text

timm = pytest.importorskip("timm")
FAST = {"calib_items": 4, "rounds": 1, "max_rows": 128}


def _recipe(method: str, bits: int = 4, **args) -> Recipe:
    d = load_builtin(f"vit-w{bits}a{bits}-{method}").to_dict()
    d["methods"] = [{"name": method, **args}]
    d["calib"] = {"batch_size": 4}
    return Recipe.from_dict(d)


def _deit(depth=2, narrow=False):
    """deit_tiny at 32×32 (patch 8); ``narrow``: width 64, 2 heads (for the slower runs)."""
    torch.manual_seed(0)
    width = dict(embed_dim=64, num_heads=2) if narrow else {}
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=depth, **width).eval()


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                             window_size=2, depths=(1, 1, 1, 1), embed_dim=32,
                             num_heads=(1, 2, 2, 4)).eval()


def _images(n=8):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean().item()


# ---------------------------------------------------------------- log√2 quantizer
def test_log2sqrt2_formula_exact_values():
    d, s2 = torch.tensor(1.0), math.sqrt(2)
    x = torch.tensor([2.0, 1.0, 2 ** -0.5, 0.5, 2 ** -3.5, 2 ** -3.9, 2 ** -4.3, 0.0])
    # q = round(-2 log2 x) = -2→0, 0, 1 (odd), 2 (even), 7 (odd), 8 → 8 ≥ 2^3 → 0, 9 → 0, inf → 0
    want = torch.tensor([1.0, 1.0, 2 ** -1 * s2, 0.5, 2 ** -4 * s2, 0.0, 0.0, 0.0])
    torch.testing.assert_close(log2sqrt2_quant(x, d, bits=3), want, rtol=0, atol=1e-7)
    q = Log2Sqrt2Quantizer(QuantSpec(bits=3, kind="log2sqrt2"))
    q.scale = torch.tensor(0.25)
    codes = q.quantize_int(x * 0.25)
    assert codes.tolist() == [0, 0, 1, 2, 7, 8, 8, 8]  # 8 = 2^b means zero
    # x̂ = Δ·√2^(−q) for every code below 2^b; the shift form gives the same value
    qs = torch.arange(8.0)
    torch.testing.assert_close(q.dequantize_int(qs), 0.25 * s2 ** -qs)
    shift, odd, zero = q.shift_form(qs)
    torch.testing.assert_close(0.25 * (1 + (s2 - 1) * odd) * 2.0 ** -shift, 0.25 * s2 ** -qs)


def test_log2_delta_is_a_percentile_picked_by_mse():
    q = Log2Sqrt2Quantizer(QuantSpec(bits=4, kind="log2sqrt2"))
    x = torch.softmax(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3, -1)
    q.mode = Mode.OBSERVE
    q(x)
    q.finish_observe()
    cands = [torch.quantile(x.flatten(), p) for p in (0.999, 0.9999, 0.99999)]
    assert any(torch.isclose(q.scale, c) for c in cands)
    errs = [(log2sqrt2_quant(x, c, 4) - x).square().mean() for c in cands]
    assert (q.fake_quant(x) - x).square().mean() <= min(errs) + 1e-12


# ---------------------------------------------------------------- twin uniform
def _twin(x, bits=4):
    q = TwinUniformQuantizer(QuantSpec(bits=bits, kind="twin_uniform"))
    q.mode = Mode.OBSERVE
    q(x)
    q.finish_observe()
    return q


def test_twin_uniform_softmax_split():
    x = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 2, -1)
    q, n = _twin(x), 7
    t = q.split.item()
    assert math.log2(t) == round(math.log2(t)) and 2 ** -19 <= t <= 1  # a power of two
    assert q.scale.item() == pytest.approx(t / n) and q.scale_high.item() == pytest.approx(1 / n)
    xq = q.fake_quant(x)
    low = x < t
    assert ((xq[low] - x[low]).abs() <= t / n / 2 + 1e-7).all()      # fine grid below split
    assert torch.allclose(xq[~low] * n, (xq[~low] * n).round(), atol=1e-5)  # coarse above
    # the split beats a single uniform grid of the same 2^(b-1) levels over [0, 1]
    uni = (x * n).round() / n
    assert (xq - x).square().mean() < (uni - x).square().mean()


def test_twin_uniform_gelu_sign_split():
    x = torch.nn.functional.gelu(torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 2)
    q, n = _twin(x), 7
    assert q.split.item() == 0
    assert q.scale.item() == pytest.approx(-x.min().item() / n)  # negatives: own fine grid
    assert q.scale_high > q.scale                                  # positives: wider step
    xq = q.fake_quant(x)
    neg = x < 0
    assert ((xq[neg] - x[neg]).abs() <= q.scale / 2 + 1e-7).all()
    codes = q.quantize_int(x)
    torch.testing.assert_close(q.dequantize_int(codes), xq)


# ---------------------------------------------------------------- graph queries
class ExplicitAttn(nn.Module):
    """LN → qkv, softmax(q kᵀ) @ v written inline, proj, LN → fc1 → GELU → fc2."""

    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():  # non-trivial affine so the fold is tested
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.2, 3.0)
                ln.bias.normal_()

    def forward(self, x):  # [B, T, d]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / 4, dim=-1)  # [B, T, T]
        x = x + self.proj(a @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def _prepared(model, x, recipe):
    prepare(model, recipe, x)
    calibrate(model, [x])
    return model


def test_sites_found_from_graph():
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    m = _prepared(ExplicitAttn(), x, _recipe("repq"))
    slots = post_softmax_slots(m)
    assert len(slots) == 1 and slots[0][1] == 0       # the probs operand of a @ v
    assert post_gelu_layers(m) == ["fc2"]
    groups = ln_linear_groups(m, recapture(m, x))
    assert [(g.weight, g.layers) for g in groups] == [("ln1.weight", ["qkv"]),
                                                      ("ln2.weight", ["fc1"])]
    assert all(g.exclusive for g in groups)
    deit = _prepared(_deit(), _images(4), _recipe("repq"))
    assert len(post_softmax_slots(deit)) == 2          # one SDPA probs per block
    assert post_gelu_layers(deit) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    pairs = {g.weight: g.layers for g in ln_linear_groups(deit, recapture(deit, _images(4)))}
    assert pairs["blocks.0.norm1.weight"] == ["blocks.0.attn.qkv"]
    assert pairs["blocks.1.norm2.weight"] == ["blocks.1.mlp.fc1"]


# ---------------------------------------------------------------- RepQ-ViT reparameterisation
def test_reparam_params_put_every_channel_on_one_grid():
    delta = torch.tensor([0.1, 0.4, 0.02, 1.0])
    zp = torch.tensor([3.0, 10.0, 0.0, 7.0])
    r, b, d_mean, z_mean = reparam_params(delta, zp)
    torch.testing.assert_close(r, delta / delta.mean())
    lo = -zp * delta                                   # channel c's range starts at min_c
    torch.testing.assert_close(lo / r - b, torch.full((4,), (-z_mean * d_mean).item()))
    torch.testing.assert_close(delta / r, torch.full((4,), d_mean.item()))  # same step


@pytest.mark.parametrize("build", ["explicit", "deit"])
def test_repq_reparameterisation_keeps_float_output(build):
    if build == "explicit":
        model, x = ExplicitAttn(), torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    else:
        model, x = _deit(), _images(4)
    m = _prepared(model, x, _recipe("repq"))
    lns = {n: p.detach().clone() for n, p in m.named_parameters() if "norm" in n or "ln" in n}
    with torch.no_grad(), quantizers_off(m):
        before = m(x)
    stats = {"reparameterized": [], "carried": [], "skipped": []}
    reparameterize(m, [x], stats)
    assert len(stats["reparameterized"]) == (2 if build == "explicit" else 5)
    with torch.no_grad(), quantizers_off(m):
        after = m(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in m.named_parameters() if n in lns and not torch.equal(p, lns[n])]
    assert changed  # the LN affine really was rewritten
    qkv = m.get_submodule("qkv" if build == "explicit" else "blocks.0.attn.qkv")
    assert qkv.input_quantizer.scale.dim() == 0      # one per-tensor quantizer remains


class PostLN(nn.Module):
    """BERT-style: the LN output feeds the next Linear layers AND the residual add; the last
    LN output is also returned (and read by a Linear, like BERT's pooler)."""

    def __init__(self, d=8):
        super().__init__()
        self.fc0, self.ln1, self.q, self.k = (nn.Linear(d, d), nn.LayerNorm(d),
                                              nn.Linear(d, d), nn.Linear(d, d, bias=False))
        self.ln2, self.pool = nn.LayerNorm(d), nn.Linear(d, d)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.2, 3.0)
                ln.bias.normal_()

    def forward(self, x):  # [B, T, d]
        h = self.ln1(self.fc0(x))
        h = self.ln2(h + self.q(h) * torch.sigmoid(self.k(h)))
        return h, self.pool(h[:, 0])


def test_post_ln_groups_are_not_exclusive():
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    m = _prepared(PostLN(), x, _recipe("repq"))
    groups = {g.weight: g for g in ln_linear_groups(m, recapture(m, x))}
    assert groups["ln1.weight"].layers == ["q", "k"]
    assert groups["ln2.weight"].layers == ["pool"]
    assert not groups["ln1.weight"].exclusive  # also read by the residual add
    assert not groups["ln2.weight"].exclusive  # returned by the model


def test_post_ln_reparameterisation_is_exact_and_leaves_the_layernorm():
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    m = _prepared(PostLN(), x, _recipe("repq"))
    ln = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("ln")}
    with torch.no_grad(), quantizers_off(m):
        before = m(x)
    stats = {"reparameterized": [], "carried": [], "skipped": []}
    reparameterize(m, [x], stats)
    assert stats["carried"] == ["ln1.weight", "ln2.weight"] and not stats["reparameterized"]
    with torch.no_grad(), quantizers_off(m):
        after = m(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, ln[n]) for n, p in m.named_parameters() if n in ln)
    assert isinstance(m.q.input_quantizer, ReparamQuantizer) and m.q.input_quantizer.scale.dim() == 0
    assert getattr(m, META_ATTR)["plan"]["layers"]["q"]["activations"]["kind"] == "reparam_uniform"


def test_layers_on_different_grids_get_their_own_reparameterisation():
    """An 8-bit and a 4-bit layer reading one LayerNorm: each carries its own (r, b), exact."""
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    d = _recipe("repq").to_dict()
    d["overrides"] = {"q": {"activations": 8}}
    m = _prepared(PostLN(), x, Recipe.from_dict(d))
    with torch.no_grad(), quantizers_off(m):
        before = m(x)[0]
    stats = {"reparameterized": [], "carried": [], "skipped": []}
    reparameterize(m, [x], stats)
    qq, qk = m.q.input_quantizer, m.k.input_quantizer
    assert (qq.spec.bits, qk.spec.bits) == (8, 4) and not torch.equal(qq.in_scale, qk.in_scale)
    with torch.no_grad(), quantizers_off(m):
        torch.testing.assert_close(m(x)[0], before, atol=1e-5, rtol=1e-5)


def test_carried_reparam_equals_per_channel_quantization():
    """Per-tensor (Δ̄, z̄) after x/r − b, with W·r and bias + W'b, gives exactly the Linear on
    the per-channel fake-quantized input (Δ_c, z_c): RepQ-ViT's equivalence."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * torch.tensor([0.1, 1, 5, 0.5, 2, 20]) + 1.0
    delta = torch.tensor([0.02, 0.3, 1.1, 0.1, 0.5, 4.0])
    zp = torch.tensor([8.0, 7.0, 6.0, 9.0, 7.0, 5.0])
    lin = nn.Linear(6, 3)
    ref = lin(fake_quant(x, delta, zp, 0, 15))
    r, b, d_mean, z_mean = reparam_params(delta, zp)
    q = ReparamQuantizer(QuantSpec(bits=4, kind="reparam_uniform"))
    q.set_affine(r, b)
    q.scale, q.zero_point, q.mode = d_mean, z_mean, Mode.QUANT
    with torch.no_grad():
        w = lin.weight * r  # [out, in] · r over input columns
        out = nn.functional.linear(q(x), w, lin.bias + w @ b)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_post_ln_artifact_bit_exact(tmp_path):
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    model = PostLN().eval()
    q = slimtorch.quantize(model, _recipe("repq"), x, seed=0)
    assert getattr(q, META_ATTR)["methods"][0]["stats"]["carried"]
    slimtorch.save(q, tmp_path / "a")
    r = slimtorch.load(tmp_path / "a", model=model)
    assert isinstance(r.q.input_quantizer, ReparamQuantizer)
    sq, sr = q.state_dict(), r.state_dict()
    assert sq.keys() == sr.keys() and all(torch.equal(sq[k], sr[k]) for k in sq)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(q(x), r(x)))


# ---------------------------------------------------------------- PTQ4ViT search
def test_ptq4vit_search_reduces_hessian_weighted_error():
    x = _images(8)
    m = _prepared(_deit(depth=1, narrow=True), x, _recipe("ptq4vit"))
    cfg = PTQ4ViTConfig(**FAST)
    units = collect(m, [x[:4], x[4:]], cfg, seed=0)
    assert "blocks.0.attn.qkv" in units and any(n.startswith("site:") for n in units)
    improved = 0
    for name, unit in units.items():
        before = unit.error()
        for q in unit.quantizers():
            if hasattr(unit, "hold"):
                unit.hold(q)
            search_quantizer(unit, q, cfg)
            if hasattr(unit, "hold"):
                unit.hold(None)
        after = unit.error()
        assert after <= before * (1 + 1e-6), name
        improved += after < before * 0.99
    assert improved >= len(units) // 2


# ---------------------------------------------------------------- whole methods, any model
@pytest.mark.parametrize("method", ["ptq4vit", "repq"])
@pytest.mark.parametrize("arch", ["deit", "swin"])
def test_methods_run_on_timm(method, arch):
    model = _deit(narrow=True) if arch == "deit" else _swin()
    x = _images(8)
    args = FAST if method == "ptq4vit" else {}
    q = slimtorch.quantize(model, _recipe(method, 8, **args), x, seed=0)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.isfinite(out).all() and _cos(ref, out) > 0.95
    stats = getattr(q, META_ATTR)["methods"][0]["stats"]
    if method == "repq":
        assert stats["log2_sites"] > 0 and stats["reparameterized"]
    else:
        assert all(u["after"] <= u["before"] * (1 + 1e-6) for u in stats["units"].values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptq4vit", "repq"])
def test_methods_run_on_minilm(method):
    from slimtorch.data.text import load_sentences, text_batches

    model, tok = load_minilm_or_skip()
    calib = text_batches(tok, load_sentences("calib", 4), batch_size=4)
    args = dict(FAST, max_rows=64, steps=20) if method == "ptq4vit" else {}
    q = slimtorch.quantize(model, _recipe(method, 8, **args), calib, seed=0)
    with torch.no_grad():
        ref = model(**calib[0]).last_hidden_state
        out = q(**calib[0]).last_hidden_state
    assert _cos(ref, out) > 0.9
    stats = getattr(q, META_ATTR)["methods"][0]["stats"]
    if method == "repq":  # post-LN BERT: every LN feeds a residual (or is returned): carried
        assert stats["log2_sites"] == 6 and len(stats["carried"]) == 13
        assert stats["float_output_rel_change"] < 1e-4 and not stats["reparameterized"]
    else:
        assert stats["units"]


# ---------------------------------------------------------------- artifact with new kinds
@pytest.mark.parametrize("method", ["ptq4vit", "repq"])
def test_save_load_bit_exact_with_new_kinds(method, tmp_path):
    model, x = _deit(depth=1, narrow=True), _images(8)
    args = FAST if method == "ptq4vit" else {}
    q = slimtorch.quantize(model, _recipe(method, 4, **args), x, seed=0)
    kinds = {type(m).__name__ for m in q.modules()}
    assert ("TwinUniformQuantizer" if method == "ptq4vit" else "Log2Sqrt2Quantizer") in kinds
    slimtorch.save(q, tmp_path / "a")
    r = slimtorch.load(tmp_path / "a", model=model)
    assert {type(m).__name__ for m in r.modules()} == kinds
    sq, sr = q.state_dict(), r.state_dict()
    assert sq.keys() == sr.keys() and all(torch.equal(sq[k], sr[k]) for k in sq)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))


@pytest.mark.parametrize("name", [f"vit-w{b}a{b}-{m}" for b in (8, 6, 4)
                                  for m in ("ptq4vit", "repq")])
def test_vit_recipes_round_trip(name):
    r = load_builtin(name)
    b = int(name[5])
    assert (r.weights.bits, r.activations.bits) == (b, b)
    assert r.method_names == [name.rsplit("-", 1)[1]]
    assert load_recipe_text(r.to_yaml()) == r and Recipe.from_dict(r.to_dict()) == r
