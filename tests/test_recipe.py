"""Recipes: built-ins round-trip, errors name key and line, overrides resolve."""
import pytest

from slimtorch.errors import RecipeError
from slimtorch.recipe import (Recipe, builtin_recipe_names, load_builtin, load_recipe_text,
                              match_override, resolve_recipe)

BUILTINS = ["w8a8", "w6a6", "w4a8", "w4a4", "w2a4", "w4a2", "w2a2"] + [
    f"{b}-{m}" for b in ("w8a8", "w4a4", "w2a4", "w4a2", "w2a2")
    for m in ("adaround", "brecq", "qdrop", "pdquant")]


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop", "pdquant"])
def test_reconstruction_recipes_share_one_scheme_across_bit_widths(method):
    """w8a8-M differs from w4a4-M only in bit widths (the W8A8 bench rows
    compare the same scheme as the other bit widths), and not from the deployable w8a8."""
    def scheme(name):
        d = load_builtin(name).to_dict()
        for k in ("name", "description", "methods"):
            d.pop(k)
        d["weights"].pop("bits")
        d["activations"].pop("bits")
        return d
    assert scheme(f"w8a8-{method}") == scheme(f"w4a4-{method}") == scheme(f"w2a2-{method}")
    assert (load_builtin(f"w8a8-{method}").methods == load_builtin(f"w4a4-{method}").methods
            == load_builtin(f"w2a2-{method}").methods)
    assert scheme("w8a8") != scheme(f"w8a8-{method}")


def test_builtins_exist():
    assert set(BUILTINS) <= set(builtin_recipe_names())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_round_trips_through_yaml_and_json(name):
    r = load_builtin(name)
    w, a = int(name[1]), int(name[3])
    assert (r.weights.bits, r.activations.bits) == (w, a)
    assert r.activations.observer == "mse"  # weights: min/max at 8 bits (w8a8), else MSE-p
    assert r.weights.observer == ("minmax" if name == "w8a8" else "mse")
    assert r.first_layer.weights == 8 and r.last_layer.activations == 8
    assert load_recipe_text(r.to_yaml()) == r
    assert Recipe.from_dict(r.to_dict()) == r


def test_unknown_key_names_key_and_line():
    text = "name: x\nweights:\n  bits: 4\n  bitz: 3\n"
    with pytest.raises(RecipeError) as e:
        load_recipe_text(text, source="my.yaml")
    msg = str(e.value)
    assert "my.yaml line 4" in msg and "'weights.bitz'" in msg and "bits" in msg


def test_bits_out_of_range_names_line():
    text = "name: x\nweights:\n  bits: 4\nactivations:\n  bits: 12\n"
    with pytest.raises(RecipeError, match=r"line 5.*activations\.bits.*between 2 and 8"):
        load_recipe_text(text)


def test_missing_required_and_bad_yaml():
    with pytest.raises(RecipeError, match="compresses nothing: give `weights:`"):
        load_recipe_text("name: x\n")
    with pytest.raises(RecipeError, match="line 3.*not valid YAML"):
        load_recipe_text("name: x\nweights: [1,\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe_text("- a\n- b\n")


def test_unknown_method_and_recipe_name():
    with pytest.raises(RecipeError, match="unknown method 'magic'"):
        load_recipe_text("name: x\nmethod: magic\nweights: {bits: 4}\n")
    with pytest.raises(RecipeError, match="unknown recipe 'w9a9'.*w8a8"):
        resolve_recipe("w9a9")
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe("nope/missing.yaml")


def test_resolve_accepts_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(load_builtin("w4a4").to_yaml())
    assert resolve_recipe(str(p)) == load_builtin("w4a4")


def test_override_matching_order():
    ov = {"fc": None, "re:layer1\\..*": {"weights": 2}, "Conv2d": {"weights": 6}}
    assert match_override(ov, "fc", "Linear") == (True, None)
    assert match_override(ov, "layer1.0.conv1", "Conv2d") == (True, {"weights": 2})
    assert match_override(ov, "layer2.0.conv1", "Conv2d") == (True, {"weights": 6})
    assert match_override(ov, "head", "Linear") == (False, None)
