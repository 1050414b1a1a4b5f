"""quantize has no global side effects (the caller's RNG and thread count are left alone), reads
any iterable or DataLoader, and quantizes in place without a copy when asked — with the same
result as the copy path."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimtorch
from slimtorch import api
from slimtorch.errors import SlimtorchError
from slimtorch.recipe import load_builtin

from conftest import make_cnn

X = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))
QDROP = dict(load_builtin("w4a4-qdrop").to_dict(), methods=[{"name": "qdrop", "iters": 4}])


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("case", ["cnn-qdrop", "mha-w8a8"])
def test_caller_rng_and_threads_untouched_and_result_independent_of_them(case):
    torch.manual_seed(0)
    model, recipe, x = ((make_cnn(), QDROP, X) if case == "cnn-qdrop" else
                        (WithMHA().eval(), "w8a8", torch.randn(16, 5, 8)))
    threads = torch.get_num_threads()
    outs = []
    for caller_seed in (123, 456):
        torch.manual_seed(caller_seed)
        state = torch.random.get_rng_state()
        outs.append(slimtorch.quantize(model, recipe, x, seed=0))
        assert torch.equal(torch.random.get_rng_state(), state)
        assert torch.get_num_threads() == threads
    assert _same(*outs)


def test_dataloader_and_generator_give_the_tensor_result():
    ref = slimtorch.quantize(make_cnn(), "w4a4", X)  # split into batches of calib.batch_size
    loader = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=32, shuffle=False)
    from_loader = slimtorch.quantize(make_cnn(), "w4a4", loader, transform=lambda b: b[0])
    from_gen = slimtorch.quantize(make_cnn(), "w4a4", (x for x in X.split(32)))
    assert _same(ref, from_loader) and _same(ref, from_gen)


def test_inplace_makes_no_copy_and_equals_the_copy_path(monkeypatch):
    ref = slimtorch.quantize(make_cnn(), QDROP, X, seed=0)
    model, deepcopy = make_cnn(), copy.deepcopy

    def no_model_copy(obj, memo=None):
        if isinstance(obj, nn.Module):
            raise AssertionError("inplace=True deep-copied the model")
        return deepcopy(obj, memo)

    monkeypatch.setattr(api.copy, "deepcopy", no_model_copy)
    q = slimtorch.quantize(model, QDROP, X, seed=0, inplace=True)
    monkeypatch.setattr(api.copy, "deepcopy", deepcopy)
    assert q is model and _same(q, ref)
    with torch.no_grad():
        assert torch.equal(q(X), ref(X))


def test_inplace_refuses_what_needs_the_float_model():
    recipe = dict(load_builtin("w4a4-pdquant").to_dict(),
                  methods=[{"name": "pdquant", "iters": 2, "dc_steps": 1}])
    with pytest.raises(SlimtorchError, match="inplace=False"):
        slimtorch.quantize(make_cnn(), recipe, X, inplace=True)


def test_training_and_speed_runs_restore_the_callers_threads_and_rng(monkeypatch, tmp_path):
    """``zoo train`` seeds torch and uses 2 threads, ``bench speed`` its --threads: only while
    they run (the work itself replaced by a probe of what it sees)."""
    from slimtorch import cli_deploy
    from slimtorch.zoo import train

    seen = []

    def probe(*args, **kwargs):
        seen.append((torch.get_num_threads(), torch.rand(1).item()))
        return nn.Linear(1, 1), 0.0

    monkeypatch.setattr(train, "_train", probe)
    monkeypatch.setattr(train, "evaluate", lambda *a: 0.0)
    monkeypatch.setattr(train, "test_set", lambda *a: (None, None))
    monkeypatch.setattr(train, "save_weights", lambda *a: None)
    monkeypatch.setattr(cli_deploy, "_measure", lambda *a: seen.append((torch.get_num_threads(),)))
    monkeypatch.setattr("slimtorch.export.artifact.read_config", lambda d: {"source": "zoo:x"})
    torch.set_num_threads(1)
    try:
        state = torch.random.get_rng_state()
        train.train_zoo_model("resnet20", seed=3)
        train.train_zoo_model("resnet20", seed=3)
        cli_deploy.measure_speed(tmp_path, threads=2)
        assert torch.get_num_threads() == 1 and torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(2)
    assert seen[0] == seen[1] and seen[0][0] == 2 and seen[2] == (2,)  # seeded, 2 threads


def test_max_samples_stops_reading_an_endless_stream():
    """An endless generator (a stand-in for a DataLoader over a whole dataset) is read only
    until max_samples samples are in; the result equals passing those items."""
    pulled = []

    def endless():
        g = torch.Generator().manual_seed(2)
        while True:
            pulled.append(1)
            yield torch.randn(16, 1, 12, 12, generator=g)

    q = slimtorch.quantize(make_cnn(), "w4a4", endless(), max_samples=40)
    assert len(pulled) == 3  # 16 + 16 + 16 >= 40: the fourth batch is never drawn
    items = list(zip(range(3), endless()))
    ref = slimtorch.quantize(make_cnn(), "w4a4", [x for _, x in items])
    assert _same(q, ref)
    with pytest.raises(SlimtorchError, match="max_samples"):
        slimtorch.quantize(make_cnn(), "w4a4", X, max_samples=0)
