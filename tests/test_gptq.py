"""GPTQ: the Cholesky/lazy-batch algorithm equals the OBQ update it is derived from, the
layer's input columns reproduce its output, and on a model it lowers the error of RTN."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import slimtorch
from slimtorch.algorithms.gptq import gptq, input_rows, proxy_error, quantize_column
from slimtorch.errors import CalibrationDataError, CalibrationWarning
from slimtorch.quant.prepare import META_ATTR


def _problem(n=24, r=5, m=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g)
    x[1] = x[0] + 0.05 * x[1]            # strongly correlated inputs: error feedback matters
    x[5] = 0.3 * x[2] - x[3]
    h = 2 * x @ x.T / m
    w = torch.randn(1, r, n, generator=g)
    s = w.abs().amax(-1, keepdim=True) / 7
    return w, h, s, torch.zeros_like(s)


def _obq(w, h, s, damp, order):
    """The OBS/OBQ update, column by column in ``order``, with the explicit inverse:
    δ = −(w_i − q_i)/[H⁻¹]_ii · H⁻¹_:,i, then H⁻¹ ← H⁻¹ − H⁻¹_:,i H⁻¹_i,: / [H⁻¹]_ii."""
    hd = h.double() + damp * h.diagonal().mean() * torch.eye(len(h), dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    w = w.double().clone()
    q = torch.zeros_like(w)
    for i in order:
        q[:, i] = quantize_column(w[:, i], s.double()[:, 0], 0.0, -8, 7)
        e = (w[:, i] - q[:, i]) / hinv[i, i]
        w -= e[:, None] * hinv[i][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return q


def test_gptq_equals_obq_and_is_block_invariant():
    w, h, s, z = _problem()
    q, st = gptq(w, h[None], s, z, -8, 7, block_size=5, damp=0.01)
    q_one, _ = gptq(w, h[None], s, z, -8, 7, block_size=1000, damp=0.01)
    assert torch.equal(q, q_one)  # lazy batches change nothing
    ref = _obq(w[0], h, s[0], 0.01, range(h.shape[0]))
    assert (q[0].double() - ref).abs().max() < 1e-4
    k = q / s
    assert (k - k.round()).abs().max() < 1e-4 and k.abs().max() <= 8  # on the grid
    assert proxy_error(q - w, h[None]) < 0.9 * st["rtn_error"]


def test_act_order_is_obq_in_decreasing_diag_order():
    w, h, s, z = _problem(seed=1)
    q, _ = gptq(w, h[None], s, z, -8, 7, block_size=7, damp=0.01, act_order=True)
    order = torch.argsort(h.diagonal(), descending=True).tolist()
    assert (q[0].double() - _obq(w[0], h, s[0], 0.01, order)).abs().max() < 1e-4


def test_diagonal_hessian_and_unseen_inputs_are_round_to_nearest():
    w, h, s, z = _problem()
    d = torch.diag(torch.rand(w.shape[-1]) + 0.5)
    assert torch.equal(gptq(w, d[None], s, z, -8, 7)[0], quantize_column(w, s, z, -8, 7))
    h = h.clone()
    h[3], h[:, 3] = 0.0, 0.0  # an input that was 0 on every calibration sample
    q, _ = gptq(w, h[None], s, z, -8, 7)
    assert torch.equal(q[..., 3], quantize_column(w, s, z, -8, 7)[..., 3])  # not zeroed
    rest = torch.arange(w.shape[-1]) != 3
    ref = _obq(w[0][:, rest], h[rest][:, rest], s[0], 0.01, range(w.shape[-1] - 1))
    assert (q[0][:, rest].double() - ref).abs().max() < 1e-4  # the others: GPTQ without it


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, stride=2, padding=1),
    nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),     # depthwise
    nn.Conv2d(6, 4, (1, 3), groups=2),
    nn.Conv1d(6, 4, 3, stride=2, padding=1),
    nn.Linear(6, 5),
])
def test_input_rows_reproduce_the_layer(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9) if isinstance(layer, nn.Conv1d) else (
        torch.randn(2, 3, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 9, 9))
    cols = input_rows(layer, x).transpose(1, 2)                 # [g, n, M]
    g = cols.shape[0]
    w = layer.weight.reshape(g, layer.weight.shape[0] // g, -1)  # [g, r, n]
    y = (w @ cols)                                              # [g, r, M]
    ref = layer(x) - layer.bias.reshape(-1, *[1] * (x.dim() - 2)).movedim(0, -1 if isinstance(
        layer, nn.Linear) else 0)
    if isinstance(layer, nn.Linear):
        assert torch.allclose(y[0].T.reshape(ref.shape), ref, atol=1e-5)
    else:
        b = x.shape[0]
        out = y.reshape(g * w.shape[1], b, -1).transpose(0, 1).reshape(ref.shape)
        assert torch.allclose(out, ref, atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.dw(x)) + x
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _w4(methods):
    return {"name": "t", "methods": methods,
            "weights": {"bits": 4, "symmetric": True, "granularity": "per_channel",
                        "observer": "minmax"}}


def rtn_small(model, calib):
    return slimtorch.quantize(model, _w4(["rtn"]), calib, self_check=False)


def test_gptq_on_a_model_beats_rtn_and_records_its_decisions():
    torch.manual_seed(0)
    model = Net().eval()
    calib = torch.randn(64, 3, 12, 12)
    test = torch.randn(64, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = slimtorch.quantize(model, _w4(["rtn"]), calib)
        q = slimtorch.quantize(model, _w4(["gptq"]), calib)
    ref = model(test)
    e_rtn, e_gptq = ((rtn(test) - ref) ** 2).mean(), ((q(test) - ref) ** 2).mean()
    assert e_gptq < 0.7 * e_rtn
    stats = getattr(q, META_ATTR)["methods"][0]["stats"]
    assert set(stats["layers"]) == {"c1", "dw", "c2", "fc"} and not stats["skipped"]
    assert all(s["gain_db"] > 0 for s in stats["layers"].values())
    with pytest.warns(CalibrationWarning, match=r"1 of 4 layers \(fc\).*at least 16"):
        few = slimtorch.quantize(model, _w4(["gptq"]), calib[:8], self_check=False)
    fc = getattr(few, META_ATTR)["methods"][0]["stats"]["layers"]["fc"]
    assert "kept_rtn" in fc  # 8 samples for 16 inputs: H is singular, GPTQ would overfit
    assert torch.equal(few.fc.weight, rtn_small(model, calib[:8]).fc.weight)
    for mod in (q.c1, q.dw, q.c2, q.fc):  # frozen codes are the GPTQ weights, 4-bit
        assert mod.weight_int.abs().max() <= 8


def test_gptq_accumulates_every_call_of_a_shared_layer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(torch.relu(self.a(x))))

    torch.manual_seed(0)
    model = Twice().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = slimtorch.quantize(model, _w4(["gptq"]), torch.randn(32, 8))
    layers = getattr(q, META_ATTR)["methods"][0]["stats"]["layers"]
    assert layers["a"]["columns"] == 2 * layers["b"]["columns"] == 64


def test_sampled_rows_estimate_the_full_hessian():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(4, 8, 40, 40)
    full = input_rows(layer, x)                                   # [8, 6400, 9]
    part = input_rows(layer, x, 2000, torch.Generator().manual_seed(0))
    assert part.shape == (8, 2000, 9)
    h_full = full.transpose(1, 2) @ full / full.shape[1]
    h_part = part.transpose(1, 2) @ part / part.shape[1]
    assert ((h_part - h_full).norm() / h_full.norm()) < 0.1


def test_cached_propagation_equals_rerunning_the_prefix(monkeypatch):
    """Unit inputs computed from the previous unit's cached inputs are the inputs a rerun of
    the model gives: the same GPTQ weights either way."""
    import slimtorch.runner.layerwise as lw

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).eval()
    calib = torch.randn(48, 3, 12, 12)
    recipe = {**_w4(["gptq"]), "activations": {"bits": 8, "symmetric": False,
                                               "granularity": "per_tensor"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = slimtorch.quantize(model, recipe, calib, self_check=False)
        monkeypatch.setattr(lw, "chained", lambda m, units, ex: [False] * len(units))
        rerun = slimtorch.quantize(model, recipe, calib, self_check=False)
    st_c = getattr(cached, META_ATTR)["methods"][0]["stats"]
    st_r = getattr(rerun, META_ATTR)["methods"][0]["stats"]
    assert st_c["units"] == st_r["units"] == st_r["prefix_runs"] == 5
    assert st_c["prefix_runs"] == 2  # the stem, and the Linear after Flatten
    for a, b in zip(cached.state_dict().values(), rerun.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def _group_fit(size):
    """Symmetric 4-bit max|w| / 7 per row of each group, recording what it was given."""
    seen = []

    def fit(cols):
        seen.append(cols.clone())
        sc = cols.abs().amax(-1).clamp(min=1e-8) / 7
        return sc, torch.zeros_like(sc)
    return (size, fit), seen


def test_group_grids_are_fitted_on_the_updated_columns():
    """Without static groups, a group's grid comes from its columns as the error feedback of
    the earlier columns left them (the public code's default), and the result is OBQ on
    that grid."""
    w, h, s, z = _problem(n=24)
    refit, seen = _group_fit(8)
    q, st = gptq(w, h[None], s, z, -8, 7, block_size=8, refit=refit)
    assert len(seen) == 3
    assert torch.equal(seen[0], w[..., :8])            # nothing updated the first group yet
    assert not torch.allclose(seen[1], w[..., 8:16])   # correlated inputs: feedback moved it
    grid = st["scale"]
    for k in range(3):  # the grid used is the fit of the group's updated columns
        torch.testing.assert_close(grid[..., 8 * k], seen[k].abs().amax(-1) / 7)
    codes = q / grid
    assert (codes - codes.round()).abs().max() < 1e-4 and codes.abs().max() <= 8
    ref = _obq(w[0], h, grid[0, :, :1].expand(-1, 1), 0.01, range(8))  # first group: OBQ
    assert (q[0, :, :8].double() - ref[:, :8]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="in order"):
        gptq(w, h[None], s, z, -8, 7, act_order=True, refit=refit)


def test_gptq_refitted_groups_are_what_the_artifact_stores(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = [torch.randn(64, 64) @ torch.randn(64, 64) * 0.2 for _ in range(2)]  # correlated
    r = {"name": "t", "methods": ["gptq"], "quantize_embeddings": False,
         "weights": {"bits": 4, "symmetric": True, "granularity": "per_group(16)",
                     "observer": "minmax"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = slimtorch.quantize(model, r, calib, self_check=False)
        r2 = {**r, "methods": [{"name": "gptq", "static_groups": True}]}
        static = slimtorch.quantize(model, r2, calib, self_check=False)
    lin = dyn[0]
    assert torch.equal(lin.weight, lin.weight_quantizer.dequantize_int(lin.weight_int))
    assert not torch.equal(lin.weight_quantizer.scale, static[0].weight_quantizer.scale)
    slimtorch.save(dyn, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(dyn(x), back(x))


def test_gptq_with_too_few_rows_for_every_layer_names_the_fix():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.raises(CalibrationDataError, match="at least 32 input rows"):
        slimtorch.quantize(model, _w4(["gptq"]), torch.randn(8, 32), self_check=False)
