"""Sparse weights: mask patterns, Wanda's score, SparseGPT's selection and OBS update, masks
respected by quantization, the packed artifact, and the errors bad input gets."""
import json

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.algorithms.gptq import gptq, inverse_cholesky
from slimtorch.errors import ArtifactError, MaskError, RecipeError
from slimtorch.recipe import resolve_recipe
from slimtorch.sparsity import apply_masks, masks_of, parse_pattern
from slimtorch.sparsity.masks import nm_mask, prune_lowest, select
from slimtorch.sparsity.sparsegpt import choose_unstructured
from slimtorch.sparsity.wanda import wanda_score

from conftest import make_cnn, sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore::slimtorch.eval.selfcheck.QuantizationCheckWarning")


class MLP(nn.Module):
    def __init__(self, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _inputs(n=512, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 10  # a few large input features: activation-aware scores matter
    return x


def _sparse_recipe(method, **kw):
    return {"name": "t", "weights": None, "methods": [{"name": method, **kw}]}


# ------------------------------------------------------------------ patterns
def test_nm_mask_keeps_the_n_largest_of_every_m_inputs():
    score = torch.tensor([[4., 1., 3., 2., 0., 9., 8., 7.]])
    assert nm_mask(score, 2, 4).tolist() == [[True, False, True, False,
                                              False, True, True, False]]
    conv = torch.randn(6, 8, 3, 3)  # groups of 4 run over input channels at each tap
    keep = nm_mask(conv.abs(), 2, 4)
    per_group = keep.movedim(1, -1).reshape(-1, 4).sum(1)
    assert per_group.eq(2).all()
    ref = conv.abs().movedim(1, -1).reshape(-1, 4).topk(2, dim=1).indices.sort(1).values
    got = keep.movedim(1, -1).reshape(-1, 4).nonzero()[:, 1].reshape(-1, 2)
    assert torch.equal(ref, got)


def test_prune_lowest_counts_and_rows():
    score = torch.arange(20.).reshape(4, 5).flip(1)
    keep = prune_lowest(score, 0.4, dim=1)  # ⌊0.4·5⌋ = 2 per row: the two smallest
    assert keep.sum(1).tolist() == [3, 3, 3, 3] and not keep[:, -2:].any()
    assert int((~prune_lowest(score, 0.5)).sum()) == 10 and not prune_lowest(score, 0.5)[0, 0] is False


def test_bad_patterns_and_ratios_name_the_fix():
    with pytest.raises(MaskError, match="outside \\(0, 1\\)"):
        parse_pattern(1.5, None)
    with pytest.raises(MaskError, match="0 < N < M"):
        parse_pattern(None, "4:4")
    with pytest.raises(MaskError, match="not a multiple of M = 4"):
        nm_mask(torch.randn(3, 6), 2, 4)
    for bad in ({"sparsity": 0.0}, {"sparsity": 1.0}, {"sparsity": 0.5, "pattern": "2:4"}, {}):
        with pytest.raises(RecipeError):
            resolve_recipe(_sparse_recipe("wanda", **bad))
    with pytest.raises(RecipeError, match="ratios"):
        resolve_recipe(_sparse_recipe("magnitude", ratios={"fc1": 1.2}))


def test_sparsity_names_build_recipes():
    r = resolve_recipe("2:4-sparsegpt")
    assert r.weights is None and r.methods[0].pattern == "2:4"
    assert resolve_recipe("70-wanda").methods[0].sparsity == pytest.approx(0.7)
    with pytest.raises(RecipeError, match="unknown recipe '50-rtn'"):
        resolve_recipe("50-rtn")  # rtn is not a sparsity method
    with pytest.raises(RecipeError, match="no sparsity method"):
        slimtorch.sparsify(MLP(), "w8a8", _inputs())


# ------------------------------------------------------------------ Wanda
def test_wanda_score_is_weight_magnitude_times_input_norm():
    w = torch.tensor([[1., -2., 3.], [-4., 5., 0.5]])
    x = torch.tensor([[1., 0., 2.], [3., 0., 0.], [0., 1., 0.]])  # column norms √10, 1, 2
    sq = x.pow(2).sum(0, keepdim=True)
    ref = w.abs() * torch.tensor([10 ** 0.5, 1., 2.])
    assert torch.allclose(wanda_score(w, sq), ref)
    keep = select(ref, parse_pattern(1 / 3, None), per_row=True)  # 1 weight per row goes
    assert keep.tolist() == [[True, False, True], [True, True, False]]


def test_wanda_on_a_model_prunes_by_its_inputs_and_beats_magnitude():
    model, x = MLP(), _inputs()
    sp = slimtorch.sparsify(model, _sparse_recipe("wanda", sparsity=0.5, dense_last=False,
                                                  dense_first=False), x)
    w = model.fc1.weight.detach()
    ref = select(w.abs() * x.pow(2).sum(0).sqrt(), parse_pattern(0.5, None), per_row=True)
    assert torch.equal(masks_of(sp)["fc1"], ref)  # the first layer sees x itself
    assert sp.fc1.weight[~ref].eq(0).all()
    mag = slimtorch.sparsify(model, _sparse_recipe("magnitude", sparsity=0.5, dense_last=False,
                                                   dense_first=False), x)
    y = model(x)
    assert sqnr_db(y, sp(x)) > sqnr_db(y, mag(x)) + 1


# ------------------------------------------------------------------ SparseGPT
def _obs_problem(n=16, r=4, m=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g)
    x[1] = x[0] + 0.1 * x[1]
    h = 2 * x @ x.T / m
    return torch.randn(1, r, n, generator=g), h, x


def test_sparsegpt_selects_by_w2_over_u2_and_updates_like_obs():
    w, h, _ = _obs_problem()
    q, st = gptq(w, h[None], None, None, 0, 0, block_size=16, damp=0.01,
                 prune=(16, choose_unstructured(0.5)))
    keep = st["keep"][0]
    u, _ = inverse_cholesky(h[None], 0.01)
    d = torch.diagonal(u[0])
    assert torch.equal(keep, prune_lowest(w[0].pow(2) / d.pow(2), 0.5))  # one block
    assert q[0][~keep].eq(0).all()
    # the same mask by the explicit OBS update: δ = −w_i/[H⁻¹]_ii · H⁻¹_:,i, then eliminate i
    hd = h.double() + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    hinv, ws = torch.linalg.inv(hd), w[0].double().clone()
    for i in range(16):
        e = (ws[:, i] - ws[:, i] * keep[:, i]) / hinv[i, i]
        ws -= e[:, None] * hinv[i][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    assert (q[0].double() - ws * keep).abs().max() < 1e-4


def test_pruning_the_first_column_is_the_least_squares_optimum_of_the_rest():
    """OBS: the update for one pruned weight is exact — the remaining weights of the row then
    solve min ‖(w − ŵ) X‖ (SparseGPT applies it column by column, each update exact for the
    columns after it)."""
    w, h, x = _obs_problem(seed=2)

    def first_only(cols, d):  # prune column 0 of every row, keep the rest
        keep = torch.ones_like(cols, dtype=torch.bool)
        keep[..., 0] = False
        return keep
    q, _ = gptq(w, h[None], None, None, 0, 0, block_size=16, damp=1e-7, prune=(16, first_only))
    assert q[0, :, 0].eq(0).all()
    sol = torch.linalg.lstsq(x[1:].T.double(), (w[0] @ x).T.double()).solution.T
    assert (q[0, :, 1:].double() - sol).abs().max() < 1e-3


def test_sparsegpt_nm_and_joint_quantization_on_a_cnn():
    model, x = make_cnn(), torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    recipe = {"name": "j", "methods": [{"name": "sparsegpt", "pattern": "2:4",
                                        "dense_first": True, "dense_last": True}],
              "weights": {"bits": 4, "symmetric": True, "granularity": "per_channel"}}
    q = slimtorch.sparsify(model, recipe, x)
    masks = masks_of(q)
    assert set(masks) == {"conv1", "conv2"}  # stem (first) and fc (last) stay dense
    for f, k in masks.items():
        layer = q.get_submodule(f)
        assert k.movedim(1, -1).reshape(-1, 4).sum(1).eq(2).all()  # 2:4 over input channels
        assert layer.weight[~k].eq(0).all()
        zero_code = layer.weight_quantizer.quantize_int(torch.zeros_like(layer.weight))
        assert torch.equal(layer.weight_int[~k], zero_code[~k])
        codes = layer.weight / layer.weight_quantizer.scale.reshape(-1, 1, 1, 1)
        assert (codes - codes.round()).abs().max() < 1e-4  # kept weights on the 4-bit grid
    stats = q._slimtorch_meta["methods"][0]["stats"]["layers"]
    assert all(st["gain_db"] > 0 for st in stats.values())  # the update beats the bare mask


def test_learned_rounding_keeps_pruned_weights_zero():
    model, x = make_cnn(), torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    recipe = {"name": "r", "weights": {"bits": 2, "symmetric": False,
                                      "granularity": "per_channel"},
              "methods": [{"name": "magnitude", "sparsity": 0.6}, {"name": "adaround",
                                                                    "iters": 20}]}
    q = slimtorch.sparsify(model, recipe, x)
    for f, k in masks_of(q).items():
        assert q.get_submodule(f).weight[~k].eq(0).all()


# ------------------------------------------------------------------ magnitude, random
def test_global_magnitude_uses_one_threshold_and_random_keeps_the_ratios():
    model, x = MLP(), _inputs()
    q = slimtorch.sparsify(model, _sparse_recipe("magnitude", sparsity=0.6, scope="global",
                                                 dense_first=False, dense_last=False), x)
    masks = masks_of(q)
    kept = torch.cat([model.get_submodule(f).weight.detach()[m].abs() for f, m in masks.items()])
    cut = torch.cat([model.get_submodule(f).weight.detach()[~m].abs()
                     for f, m in masks.items()])
    assert kept.min() >= cut.max()
    assert len({round(1 - m.float().mean().item(), 3) for m in masks.values()}) > 1
    ratios = {f: round(1 - m.float().mean().item(), 4) for f, m in masks.items()}
    r = slimtorch.sparsify(model, _sparse_recipe("random", ratios=ratios, dense_first=False,
                                                 dense_last=False), x)
    for f, m in masks_of(r).items():
        assert abs((1 - m.float().mean().item()) - ratios[f]) < 2 / m.numel()
        assert not torch.equal(m, masks[f])


def test_apply_masks_refuses_other_shapes_and_layers():
    q = slimtorch.sparsify(MLP(), _sparse_recipe("magnitude", sparsity=0.5), _inputs())
    with pytest.raises(MaskError, match="does not fit a weight"):
        apply_masks(q, {"fc2": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="no prepared layer 'fc9'"):
        apply_masks(q, {"fc9": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="no layer of this model can take 2:4"):
        slimtorch.sparsify(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)),
                           _sparse_recipe("magnitude", pattern="2:4"), torch.randn(8, 6))


# ------------------------------------------------------------------ artifact
@pytest.mark.parametrize("weights", [None, {"bits": 4, "symmetric": True,
                                            "granularity": "per_channel"}])
def test_sparse_artifact_is_packed_reloads_exactly_and_refuses_tampering(tmp_path, weights):
    model, x = MLP(), _inputs()
    recipe = {"name": "a", "weights": weights, "methods": [{"name": "sparsegpt",
                                                            "sparsity": 0.75}]}
    q = slimtorch.sparsify(model, recipe, x)
    slimtorch.save(q, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", model=model)
    for f, m in masks_of(q).items():
        assert torch.equal(masks_of(back)[f], m)
        assert torch.equal(back.get_submodule(f).weight, q.get_submodule(f).weight)
    assert torch.equal(back(x), q(x))
    cfg = json.loads((tmp_path / "a" / "slimtorch.json").read_text())
    assert cfg["sparse"]["fc2"]["kept"] == 64 * 64 // 4
    from slimtorch.eval.size import fp_size_bytes, quantized_size_bytes
    dense = (fp_size_bytes(model) if weights is None else quantized_size_bytes(
        slimtorch.quantize(model, {"name": "d", "weights": weights, "methods": ["rtn"]}, x)))
    bits = 32 if weights is None else 4
    # fc2 (the only masked layer: fc1 first, fc3 last) keeps 1/4 of its values + 1 bit each
    saved = 64 * 64 * bits // 8 - (64 * 64 // 4 * bits // 8 + 64 * 64 // 8)
    assert quantized_size_bytes(q) <= dense - saved + 64
    data = bytearray((tmp_path / "a" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "a" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        slimtorch.load(tmp_path / "a", model=model)


def test_sparsify_cli_refuses_a_recipe_without_sparsity(capsys):
    from slimtorch.cli import main
    assert main(["sparsify", "--model", "zoo:resnet20", "--recipe", "w8a8", "--out",
                 "/nonexistent/x"]) == 2
    assert "no sparsity method" in capsys.readouterr().err


def test_depthwise_convs_stay_dense_by_default():
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.pw(torch.relu(self.dw(self.a(x)))).mean((2, 3)))
    x = torch.randn(16, 1, 8, 8)
    q = slimtorch.sparsify(DW(), _sparse_recipe("magnitude", sparsity=0.5), x)
    assert set(masks_of(q)) == {"pw"}
    stats = q._slimtorch_meta["methods"][0]["stats"]["skipped"]
    assert stats["dw"] == "depthwise (dense_depthwise)"
    q = slimtorch.sparsify(DW(), _sparse_recipe("magnitude", sparsity=0.5,
                                                dense_depthwise=False), x)
    assert set(masks_of(q)) == {"dw", "pw"}


def test_wanda_dense_inputs_read_the_dense_model():
    model, x = MLP(), _inputs()
    sp = slimtorch.sparsify(model, _sparse_recipe("wanda", sparsity=0.5, dense_first=False,
                                                  dense_last=False, sequential="dense"), x)
    h = torch.relu(model.fc1(x)).detach()  # fc2's input in the dense model
    w = model.fc2.weight.detach()
    ref = select(w.abs() * h.pow(2).sum(0).sqrt(), parse_pattern(0.5, None), per_row=True)
    assert torch.equal(masks_of(sp)["fc2"], ref)


def test_layerwise_methods_run_on_padded_batches_of_different_lengths():
    """Calibration items padded to different lengths cannot be cached per unit: the layers are
    fed by runs of the model instead (the same masks as from one long batch)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
    g = torch.Generator().manual_seed(1)
    items = [{"input_ids": torch.randint(0, 50, (4, n), generator=g),
              "attention_mask": torch.ones(4, n, dtype=torch.long)} for n in (7, 11)]
    for method in ("wanda", "sparsegpt"):
        sp = slimtorch.sparsify(Emb(), _sparse_recipe(method, pattern="2:4"), items)
        masks = masks_of(sp)
        assert len(masks) >= 10
        assert all(m.reshape(-1, 4).sum(1).eq(2).all() for m in masks.values())
