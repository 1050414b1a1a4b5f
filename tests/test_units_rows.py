"""Units whose dim 0 is not the calibration samples (MobileViT folds patches into the batch, a
position index has no batch dim): the runners must not cache them per sample, and the methods
still run — GPTQ feeds such layers from model runs, reconstruction leaves them at nearest
rounding and says so."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import SharedLayerError
from slimtorch.quant.prepare import META_ATTR, prepare
from slimtorch.recipe import load_builtin
from slimtorch.runner.units import partition


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class PatchBlock(nn.Module):
    """Unfolds 2×2 patches into the batch (B → 4B), a residual block on them, folds back."""

    def __init__(self, c: int):
        super().__init__()
        self.inner = Residual(c)

    def forward(self, x):
        b, c, h, w = x.shape
        p = x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        p = self.inner(p.reshape(b * 4, c, h // 2, w // 2))
        p = p.reshape(b, 2, 2, c, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5)
        return p.reshape(b, c, h, w)


class Folding(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.patches = PatchBlock(8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        return self.head(self.patches(torch.relu(self.stem(x))))


W8 = {"bits": 8, "symmetric": True, "granularity": "per_channel", "observer": "minmax"}


@pytest.fixture(scope="module")
def model_and_calib():
    g = torch.Generator().manual_seed(0)
    model = Folding().eval()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return model, torch.randn(24, 3, 8, 8, generator=g)


def _quantize(model, calib, methods, **weights):
    recipe = {"name": "t", "methods": methods, "weights": {**W8, **weights},
              "activations": {"bits": 8, "symmetric": False, "granularity": "per_tensor"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimtorch.quantize(model, recipe, calib, self_check=False)


def test_folded_layers_are_not_per_sample_units(model_and_calib):
    model, calib = model_and_calib
    prepared = copy.deepcopy(model)
    prepare(prepared, load_builtin("w8a8"), calib[:8])
    units = {u.name: u for u in partition(prepared, calib[:8])}
    assert not units["patches.inner.a"].per_sample and not units["patches.inner.b"].per_sample
    assert units["stem"].per_sample and units["head.2"].per_sample
    assert "patches.inner" not in units  # the block folds the batch: split into layers


def test_gptq_feeds_folded_layers_from_model_runs(model_and_calib, monkeypatch):
    """GPTQ on the folded layers equals GPTQ with every layer fed by whole-model runs."""
    import slimtorch.runner.layerwise as lw

    model, calib = model_and_calib
    got = _quantize(model, calib, [{"name": "gptq", "max_columns": 10**9}], bits=4)
    st = getattr(got, META_ATTR)["methods"][0]["stats"]
    assert set(st["layers"]) == {"stem", "patches.inner.a", "patches.inner.b", "head.0", "head.2"}
    monkeypatch.setattr(lw, "partition", lambda *a, **k: (_ for _ in ()).throw(
        SharedLayerError("force the whole-model path")))
    ref = _quantize(model, calib, [{"name": "gptq", "max_columns": 10**9}], bits=4)
    for (k, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    rtn = _quantize(model, calib, ["rtn"], bits=4)
    assert not torch.equal(got.patches.inner.a.weight, rtn.patches.inner.a.weight)  # really solved


def test_reconstruction_skips_folded_layers_and_says_so(model_and_calib):
    model, calib = model_and_calib
    got = _quantize(model, calib, [{"name": "qdrop", "iters": 4, "batch_size": 8}], bits=4)
    per_unit = {u["unit"]: u for u in getattr(got, META_ATTR)["methods"][0]["stats"]["per_unit"]}
    assert "dim 0" in per_unit["patches.inner.a"]["skipped"]
    assert "skipped" not in per_unit["stem"] and per_unit["stem"]["loss_after"] is not None
    x = calib[:8]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(got(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.9


def test_the_graph_is_captured_once(model_and_calib, monkeypatch):
    """prepare captures the graph; GPTQ and QDrop query it (``graph_of``) instead of capturing
    again, and a changed module structure is captured afresh."""
    import slimtorch.graph.capture as cap
    import slimtorch.quant.prepare as prep

    model, calib = model_and_calib
    calls = []
    real = cap.capture

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cap, "capture", counting)
    monkeypatch.setattr(prep, "capture", counting)
    q = _quantize(model, calib, [{"name": "gptq"}, {"name": "qdrop", "iters": 2}], bits=4)
    assert len(calls) == 1
    q.head[0] = nn.Conv2d(8, 8, 1)  # a rewrite: the remembered graph no longer applies
    cap.graph_of(q, calib[:8])
    assert len(calls) == 2


def _llama_gptq(use_cache: bool, monkeypatch=None):
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_smoothquant import CALIB, HELD, tiny_llama
    m = tiny_llama(2, layers=4)
    m.config.use_cache = use_cache
    r = {"name": "t", "methods": ["gptq"], "quantize_embeddings": False,
         "last_layer": {"weights": None},
         "weights": {"bits": 4, "symmetric": True, "granularity": "per_group(64)",
                     "observer": "minmax"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = slimtorch.quantize(m, r, CALIB, self_check=False)
    with torch.no_grad():
        logits = q(**HELD).logits
    return q._slimtorch_meta["methods"][0]["stats"], logits


def test_decoder_layers_with_shared_keyword_arguments_are_units(monkeypatch):
    """A Hugging Face decoder layer is called with the hidden states plus rotary tables and
    flags shared by all samples: it is one cached unit that carries them (``Unit.extras``),
    so GPTQ runs the model prefix once instead of once per layer, with the same result. With
    a KV cache (a stateful argument) the layers are split and fed from model runs."""
    import slimtorch.runner.units as units
    st, logits = _llama_gptq(use_cache=False)
    assert (st["units"], st["prefix_runs"]) == (4, 1)
    monkeypatch.setattr(units, "_shared", lambda extras, n: not (extras[0] or extras[1]))
    st_split, logits_split = _llama_gptq(use_cache=False)
    assert st_split["units"] > 20 and st_split["prefix_runs"] > 20
    assert torch.allclose(logits, logits_split, atol=1e-5)
    monkeypatch.undo()
    st_cache, logits_cache = _llama_gptq(use_cache=True)
    assert st_cache["units"] > 20
    assert torch.allclose(logits, logits_cache, atol=1e-5)
