"""The command line, end to end on the bundled ResNet-20 and with bad input."""
import json
import os

import pytest

from slimtorch.cli import main
from slimtorch.zoo.registry import weights_path

needs_zoo = pytest.mark.skipif(not weights_path("resnet20").is_file(),
                               reason="zoo weights not trained")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zoo_list_and_recipes(capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and "resnet20" in out and "mobilenetv2" in out and "vit" in out
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "w2a2" in out
    code, out, _ = run(capsys, "recipes", "w4a4")
    assert code == 0 and "bits: 4" in out


@needs_zoo
def test_quantize_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "r20"
    code, out, _ = run(capsys, "quantize", "--model", "zoo:resnet20", "--recipe", "w8a8",
                       "--calib-size", "128", "--out", str(out_dir), "--quiet")
    assert code == 0 and "top-1 %" in out
    m = json.loads((out_dir / "metrics.json").read_text())
    for key in ("model", "recipe", "fp_top1", "q_top1", "fp_size_bytes", "q_size_bytes",
                "calib_seconds"):
        assert key in m
    assert m["q_top1"] >= m["fp_top1"] - 0.5  # W8A8 is near-lossless
    assert m["q_size_bytes"] * 3.5 < m["fp_size_bytes"]
    code, out, _ = run(capsys, "eval", str(out_dir), "--quiet")
    assert code == 0 and f"{m['q_top1']}" in out  # reload reproduces the score exactly
    assert m["self_check"]["passed"] and m["self_check"]["output_sqnr_db"] > 25
    code, out, _ = run(capsys, "inspect", str(out_dir), "--all")
    assert code == 0 and "cumulative dB" in out and "self-check: output SQNR" in out
    assert "layers.0.conv1" in out and "fc" in out  # every layer, by name


@pytest.mark.parametrize("argv,msg", [
    (["--model", "zoo:resnet99", "--recipe", "w8a8"], "unknown zoo model"),
    (["--model", "foo:bar", "--recipe", "w8a8"], "no evaluation task for 'foo:bar'"),
    (["--model", "zoo:resnet20", "--recipe", "w9a9"], "unknown recipe 'w9a9'"),
    (["--model", "zoo:resnet20", "--recipe", "w8a8", "--data-dir", "/nonexistent"],
     "apt-get install dataset-fashion-mnist"),
    (["--model", "zoo:resnet20", "--recipe", "w8a8", "--eval-size", "10"], "drop --eval-size"),
    (["--model", "minilm", "--recipe", "w8a8", "--eval-size", "0"], "between 1 and 1000"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, msg):
    code, _, err = run(capsys, "quantize", *argv, "--out", str(tmp_path / "x"), "--quiet")
    assert code == 2 and err.startswith("error:") and msg.lower() in err.lower()
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_bad_recipe_file_names_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: mine\nweights:\n  bits: 4\n  granularity: per_row\n")
    code, _, err = run(capsys, "quantize", "--model", "zoo:resnet20", "--recipe", str(bad),
                       "--out", str(tmp_path / "x"), "--quiet")
    assert code == 2 and "bad.yaml line 4" in err and "granularity" in err


def test_eval_of_damaged_artifact(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    code, _, err = run(capsys, "eval", str(tmp_path / "a"))
    assert code == 2 and "not a slimtorch artifact" in err
    assert os.listdir(tmp_path / "a") == []


def test_report_of_bad_input_is_one_line_error(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    code, _, err = run(capsys, "report", str(tmp_path / "a"), "--out", str(tmp_path / "r.html"))
    assert code == 2 and "not a slimtorch artifact" in err and "slimtorch quantize" in err
    code, _, err = run(capsys, "report", str(tmp_path / "a"), "--out", str(tmp_path / "r.pdf"))
    assert code == 2 and "ending in .html" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing written
