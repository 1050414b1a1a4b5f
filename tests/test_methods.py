"""The method registry and the recipe's ``methods:`` list: typed entries validated once, errors
that name the line, round trips, the old one-method form, methods run in order, and the values
``auto`` resolved to recorded in the artifact and metrics.json."""
import json

import pytest
import torch
from torch import nn

import slimtorch
from slimtorch.errors import RecipeError
from slimtorch.methods import (MethodConfig, MethodContext, handler_for, method_names,
                               register_method)
from slimtorch.quant.prepare import META_ATTR
from slimtorch.recipe import Recipe, builtin_recipe_names, load_builtin, load_recipe_text

from conftest import make_cnn

BASE = "name: x\nweights: {bits: 4}\nactivations: {bits: 4}\n"


class OrderConfig(MethodConfig):
    """A toy method defined entirely in this test module: one class and one function."""

    tag: str = "a"
    scale: float | str = "auto"

    def auto_values(self, model, ctx):
        return {"scale": 0.5} if self.scale == "auto" else {}


@register_method("test_order", OrderConfig)
def _apply_order(model, cfg: OrderConfig, ctx: MethodContext) -> dict:
    return {"tag": cfg.tag, "scale": cfg.scale, "position": len(getattr(model, "_order", []))}


def test_every_method_module_registers_itself():
    assert {"rtn", "adaround", "brecq", "qdrop", "pdquant", "ptq4vit", "repq"} <= set(
        method_names())
    for name in builtin_recipe_names():
        for cfg in load_builtin(name).methods:
            assert handler_for(cfg).config is type(cfg)


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_every_builtin_round_trips(name):
    r = load_builtin(name)
    assert r.methods and all(isinstance(m, MethodConfig) for m in r.methods)
    assert load_recipe_text(r.to_yaml()) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.to_dict()["methods"][0]["name"] == r.method_names[0]


def test_entry_forms_and_order():
    r = load_recipe_text(BASE + "methods:\n  - qdrop\n  - {name: adaround, iters: 7}\n")
    assert r.method_names == ["qdrop", "adaround"]
    assert r.methods[0] == load_builtin("w4a4-qdrop").methods[0] and r.methods[1].iters == 7
    assert load_recipe_text(BASE).method_names == ["rtn"]  # no methods: calibrated ranges


def test_bad_entries_name_the_line():
    text = BASE + "methods:\n  - qdrop\n  - name: adaround\n    iters: 7\n    itres: 3\n"
    with pytest.raises(RecipeError) as e:
        load_recipe_text(text, source="r.yaml")
    msg = str(e.value)
    assert "r.yaml line 8: methods[1] (adaround): unknown key 'itres'" in msg
    assert "allowed: iters" in msg
    with pytest.raises(RecipeError, match=r"line 5.*unknown method 'magic'.*qdrop"):
        load_recipe_text(BASE + "methods:\n  - magic\n")
    with pytest.raises(RecipeError, match=r"line 6.*methods\[0\] \(qdrop\): bad value for "
                                          r"'iters'"):
        load_recipe_text(BASE + "methods:\n  - name: qdrop\n    iters: -1\n")
    with pytest.raises(RecipeError, match="method name or a mapping with a 'name'"):
        load_recipe_text(BASE + "methods:\n  - {iters: 3}\n")


def test_old_one_method_form_is_read_as_a_list():
    old = BASE + "method: qdrop\nmethod_args:\n  iters: 12\n  act_lr: 0.001\n"
    r = load_recipe_text(old)
    assert r == load_recipe_text(BASE + "methods: [{name: qdrop, iters: 12, act_lr: 0.001}]")
    assert load_recipe_text(BASE + "method: rtn\n").method_names == ["rtn"]
    with pytest.raises(RecipeError, match=r"line 6: methods\[0\] \(qdrop\): unknown key 'itr'"):
        load_recipe_text(BASE + "method: qdrop\nmethod_args:\n  itr: 3\n")
    with pytest.raises(RecipeError, match="give `methods:` only"):
        load_recipe_text(BASE + "method: qdrop\nmethods: [qdrop]\n")


def test_artifact_saved_in_the_old_form_reloads(tmp_path):
    cnn, x = make_cnn(), torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    q = slimtorch.quantize(cnn, "w4a4", x, seed=0)
    slimtorch.save(q, tmp_path / "a")
    cfg_file = tmp_path / "a" / "slimtorch.json"
    cfg = json.loads(cfg_file.read_text())
    rec = cfg["meta"]["recipe"]
    rec.pop("methods")
    rec.update(method="rtn", method_args={})  # what slimtorch wrote before the methods list
    cfg["meta"].pop("methods")
    cfg["meta"]["method_stats"] = {}
    cfg_file.write_text(json.dumps(cfg))
    r = slimtorch.load(tmp_path / "a", model=make_cnn())
    assert Recipe.from_dict(getattr(r, META_ATTR)["recipe"]) == load_builtin("w4a4")
    with torch.no_grad():
        assert torch.equal(r(x), q(x))


def test_methods_run_in_order_with_auto_resolved(tmp_path):
    recipe = dict(load_builtin("w4a4").to_dict(),
                  methods=["test_order", {"name": "test_order", "tag": "b", "scale": 2.0}])
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    q = slimtorch.quantize(make_cnn(), recipe, x)
    recs = getattr(q, META_ATTR)["methods"]
    assert [(m["name"], m["stats"]["tag"], m["stats"]["scale"]) for m in recs] == [
        ("test_order", "a", 0.5), ("test_order", "b", 2.0)]
    assert recs[0]["auto"] == {"scale": 0.5} and recs[1]["auto"] == {}
    assert recs[0]["config"] == {"tag": "a", "scale": 0.5}
    slimtorch.save(q, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "slimtorch.json").read_text())["meta"]["methods"]
    assert saved[0]["auto"] == {"scale": 0.5}


def test_qdrop_auto_values_reach_artifact_and_metrics(tmp_path, monkeypatch):
    """metrics.json and the artifact record what act_lr/lr/round_weight auto became."""
    from slimtorch import pipeline

    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))

    class Task:
        kind = "toy"

        def calibration(self, n, seed, batch_size):
            return x

        def outputs(self, model, progress):
            with torch.no_grad():
                return model(x)

        def score(self, out, ref=None):
            return {"mse": 0.0 if ref is None else float((out - ref).square().mean())}

    monkeypatch.setattr(pipeline, "task_for", lambda source, data_dir: Task())
    monkeypatch.setattr(pipeline, "load_model", lambda source: make_cnn())
    recipe = dict(load_builtin("w4a4-qdrop").to_dict(), methods=[{"name": "qdrop", "iters": 5}])
    m, _ = pipeline.run_quantize("toy", recipe, out=tmp_path / "o")
    want = {"lr": 1e-2, "round_weight": 0.01, "act_lr": 4e-3}  # 5 iters: the 200-iter rates
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "o" / "slimtorch.json").read_text())["meta"]["methods"]
    for rec in (metrics["methods"][0], saved[0]):
        assert rec["auto"] == pytest.approx(want)
        assert rec["config"]["act_lr"] == pytest.approx(want["act_lr"])
        assert len(rec["stats"]["per_unit"]) >= 2
    assert metrics["method"] == "qdrop"
