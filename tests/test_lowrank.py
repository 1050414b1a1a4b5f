"""Low-rank factorisation (prune/lowrank.py): the SVD factors, the energy rank, the MACs of a
factorised layer, the DP under a MACs target, the artifact round trip, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import PruningError, RecipeError
from slimtorch.graph.capture import capture
from slimtorch.prune import pruning_record
from slimtorch.prune.lowrank import break_even, energy_rank, factor_macs
from slimtorch.prune.surgery import factorised
from slimtorch.prune.surgery import count_macs, layer_costs
from slimtorch.zoo.sources import load_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.dw(x).mean((2, 3)))


def test_factors_are_the_truncated_svd_and_run_as_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    w = conv.weight.detach().reshape(12, -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    x = torch.randn(2, 8, 9, 9)
    for r in (1, 4, 12):
        seq = factorised(conv, r)
        assert seq[0].weight.shape == (r, 8, 3, 3) and seq[1].weight.shape == (12, r, 1, 1)
        prod = seq[1].weight.reshape(12, r).double() @ seq[0].weight.reshape(r, -1).double()
        assert torch.allclose(prod, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
        approx = copy.deepcopy(conv)
        with torch.no_grad():
            approx.weight.copy_(prod.reshape(conv.weight.shape).float())
            assert torch.allclose(seq(x), approx(x), atol=1e-4)
    with torch.no_grad():  # full rank: the layer itself
        assert torch.allclose(factorised(conv, 12)(x), conv(x), atol=1e-4)
    lin = nn.Linear(20, 6)
    seq = factorised(lin, 3)
    assert seq[0].weight.shape == (3, 20) and seq[1].bias is not None
    # energy: the smallest r with Σ_{i≤r} σ² ≥ e·Σσ²
    s2 = s ** 2
    for e in (0.5, 0.9, 0.99):
        r = energy_rank(conv, e)
        assert s2[:r].sum() >= e * s2.sum() - 1e-9 and (r == 1 or s2[:r - 1].sum() < e * s2.sum())
    # MACs per output position: r·(in·k²) + out·r; break-even below out·in·k²/(in·k²+out)
    assert factor_macs(12 * 72 * 25, conv, 4) == 25 * (4 * 72 + 12 * 4)
    assert break_even(conv) == 10  # 12·72/84 = 10.29: rank 10 has fewer MACs, 11 more
    assert factor_macs(1.0, conv, 11) >= 1.0 > factor_macs(1.0, conv, 10)


def test_macs_target_by_dp_replays_from_the_artifact(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    pm = slimtorch.prune(model, "macs-0.6-lowrank", calib, self_check=False)
    rec = pruning_record(pm)
    assert rec["macs"]["ratio"] <= 0.6 + 1e-6 and rec["macs"]["ratio"] > 0.45
    assert "dw" not in rec["ranks"] and isinstance(pm.c2, nn.Sequential)
    macs = count_macs(pm, capture(pm, calib[0])) / count_macs(model, capture(model, calib[0]))
    assert macs == pytest.approx(rec["macs"]["ratio"], abs=1e-4)
    # the predicted distortion is Σδ of the chosen ranks (0: dense), and no other choice of
    # measured ranks within the MACs budget has a lower Σδ (brute force)
    curves = rec["curves"]
    assert rec["distortion_predicted"] == pytest.approx(
        sum(curves[f][str(rec["ranks"].get(f, {"rank": 0})["rank"])] for f in curves))
    import itertools
    costs = layer_costs(model, capture(model, calib[0]))
    base = sum(c["macs"] for c in costs.values())
    fixed = base - sum(costs[f]["macs"] for f in curves)

    def cost(f, r):
        m = costs[f]["macs"]
        return m if r == 0 else factor_macs(m, getattr(model, f), r)
    best = min(sum(curves[f][str(r)] for f, r in zip(curves, combo))
               for combo in itertools.product(*[[int(k) for k in curves[f]] for f in curves])
               if fixed + sum(cost(f, r) for f, r in zip(curves, combo)) <= 0.6 * base)
    assert rec["distortion_predicted"] == pytest.approx(best, rel=1e-9)
    slimtorch.save(pm, tmp_path / "a")
    back = slimtorch.load(tmp_path / "a", model=model)
    with torch.no_grad():
        assert torch.equal(back(calib[0]), pm(calib[0]))
    energy = {"name": "e", "weights": None, "methods": [{"name": "lowrank", "energy": 0.5}]}
    pe = slimtorch.prune(model, energy, calib, self_check=False)
    assert all(v["rank"] <= break_even(getattr(model, f)) for f, v in
               pruning_record(pe)["ranks"].items())


def test_lowrank_errors():
    model = Net().eval()
    calib = [torch.randn(4, 3, 16, 16)]
    with pytest.raises(PruningError, match="cannot be met"):
        slimtorch.prune(model, "macs-0.01-lowrank", calib, self_check=False)
    with pytest.raises(RecipeError, match="one of energy"):
        slimtorch.resolve_recipe({"name": "x", "weights": None, "methods": [
            {"name": "lowrank", "energy": 0.9, "target": {"macs": 0.5}}]})


def test_resnet20_lowrank_then_w8a8():
    """Composes with quantization: the factor convs are quantized like any conv."""
    model = load_model("zoo:resnet20").eval()
    calib = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    recipe = {"name": "lr-w8a8", "weights": {"bits": 8}, "activations": {"bits": 8},
              "methods": [{"name": "lowrank", "target": {"macs": 0.7}, "levels": 4,
                           "samples": 16}, "rtn"]}
    qm = slimtorch.quantize(model, recipe, calib, self_check=False)
    assert any(type(m).__name__ == "QuantConv2d" for m in qm.modules())
    assert pruning_record(qm)["macs"]["ratio"] <= 0.7 + 1e-6
