"""``slimtorch sweep``: the grid, resume after a kill, retries, failures, serial fallback, and a
real sweep on a local Ray runtime killed mid-way and resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from slimtorch.cli import main
from slimtorch.errors import SlimtorchError
from slimtorch import sweeps as sw
from slimtorch.zoo.registry import weights_path

SPEC = {"name": "t", "models": ["zoo:resnet20", "zoo:vit"], "recipes": ["w8a8", "w4a8"],
        "seeds": [0, 1], "calib_size": 32}


def test_expand_is_the_grid_and_checks_everything_first(tmp_path):
    rec = tmp_path / "mine.yaml"
    rec.write_text("name: mine\nweights: {bits: 6}\nactivations: {bits: 8}\n")
    (tmp_path / "s.yaml").write_text("name: g\nmodels: [zoo:resnet20, zoo:vit]\n"
                                     "recipes: [w8a8, mine.yaml]\nseeds: [0, 1, 2]\n")
    spec, base = sw.load_spec(tmp_path / "s.yaml")
    trials = sw.expand(spec, base)
    assert len(trials) == 2 * 2 * 3 and len({t["id"] for t in trials}) == 12
    assert trials[0]["id"] == "zoo-resnet20__w8a8__seed0"
    assert [t["seed"] for t in trials[:3]] == [0, 1, 2]  # grid order: model, recipe, seed
    mine = [t for t in trials if t["recipe_label"] == "mine"]
    assert mine[0]["recipe"] == str(rec)  # a recipe file is relative to the spec
    fp = mine[0]["recipe_fingerprint"]
    rec.write_text("name: mine\nweights: {bits: 5}\nactivations: {bits: 8}\n")
    assert sw.expand(spec, base)[3]["recipe_fingerprint"] != fp  # an edit makes it stale


def test_inline_recipes_run_as_written(tmp_path, monkeypatch):
    """A recipe written out in the spec is labelled by its name; the trial gets the recipe
    itself; a bad one is the recipe's own clear error, before anything runs."""
    calls = _fake_runs(monkeypatch, {})
    inline = {"name": "w5a8-long", "weights": {"bits": 5}, "activations": {"bits": 8},
              "methods": [{"name": "adaround", "iters": 7}]}
    res = sw.sweep({**SPEC, "models": ["zoo:vit"], "recipes": ["w8a8", inline],
                    "seeds": [0]}, tmp_path / "o")
    assert res["failures"] == {}
    assert [r["trial"] for r in res["rows"]] == ["zoo-vit__w8a8__seed0",
                                                 "zoo-vit__w5a8-long__seed0"]
    sent = calls[1][1]
    assert sent["weights"]["bits"] == 5 and sent["methods"][0]["iters"] == 7
    with pytest.raises(SlimtorchError, match="unknown method 'adaroud'"):
        sw.sweep({**SPEC, "recipes": [{**inline, "methods": ["adaroud"]}]}, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(sw.SweepError, match="both named 'w8a8'"):
        sw.sweep({**SPEC, "recipes": ["w8a8", {**inline, "name": "w8a8"}]}, tmp_path / "o3")


@pytest.mark.parametrize("text, needle", [
    ("models: [zoo:resnet2]\nrecipes: [w8a8]\n", "Known models"),
    ("models: [zoo:resnet20]\nrecipes: [w8a9]\n", "unknown recipe 'w8a9'"),
    ("models: [torchvision:resnet18]\nrecipes: [w8a8]\n", "evaluates zoo:NAME models"),
    ("models: [zoo:resnet20]\nrecipe: [w8a8]\n", "line 2: unknown key 'recipe'"),
    ("models: [zoo:resnet20]\nrecipes: [w8a8]\nseeds: [0, 0]\n", "line 3: bad value for "
     "'seeds': listed twice: 0"),
    ("models: [zoo:resnet20]\nrecipes: [w8a8, w8a8.yaml]\n", "does not exist"),
    ("- zoo:resnet20\n", "must be a mapping"),
])
def test_bad_spec_is_one_clear_error(tmp_path, capsys, text, needle):
    (tmp_path / "s.yaml").write_text(text)
    assert main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the grid is valid


def _fake_runs(monkeypatch, behaviour: dict):
    """run_quantize replaced by a stub that writes metrics.json like the real one, or raises
    what ``behaviour[(model, recipe, seed)]`` lists, one entry per call."""
    calls = []

    def fake(model, recipe, *, out, seed, calib_size, **kw):
        calls.append((model, recipe, seed))
        label = recipe if isinstance(recipe, str) else recipe["name"]  # inline: a dict
        todo = behaviour.get((model, label, seed), [])
        if todo:
            raise todo.pop(0)
        m = {"model": model, "recipe": recipe, "seed": seed, "calib_size": calib_size,
             "fp_top1": 90.0, "q_top1": 89.0 + seed / 10, "q_size_bytes": 1000,
             "calib_seconds": 0.1}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m))
        return m, None

    import slimtorch.pipeline
    monkeypatch.setattr(slimtorch.pipeline, "run_quantize", fake)
    monkeypatch.setattr(sw, "ray_available", lambda: False)  # the serial fallback
    return calls


def test_serial_retries_once_reports_failures_and_resumes(tmp_path, monkeypatch):
    flaky, broken = ("zoo:vit", "w8a8", 0), ("zoo:vit", "w4a8", 1)
    bad_input = ("zoo:resnet20", "w4a8", 0)
    calls = _fake_runs(monkeypatch, {
        flaky: [RuntimeError("worker lost")],
        broken: [MemoryError("out of memory"), MemoryError("out of memory again")],
        bad_input: [SlimtorchError("this recipe does not fit")]})
    events = []
    res = sw.sweep(SPEC, tmp_path / "o", on_event=lambda k, t, i: events.append((k, t.get("id"))))
    assert res["backend"] == "serial" and len(res["rows"]) == 6
    assert calls.count(flaky) == 2 and calls.count(broken) == 2  # retried once
    assert calls.count(bad_input) == 1  # bad input is not retried
    assert res["failures"] == {"zoo-vit__w4a8__seed1": "MemoryError: out of memory again",
                               "zoo-resnet20__w4a8__seed0":
                               "SlimtorchError: this recipe does not fit"}
    assert ("retry", "zoo-vit__w8a8__seed0") in events and events[0][0] == "start"
    saved = json.loads((tmp_path / "o" / "failures.json").read_text())
    assert saved == res["failures"]
    md = (tmp_path / "o" / "results.md").read_text()
    assert md.count("| zoo:") == 6 + 4  # 6 trials, then the 4 model × recipe pairs
    assert "| zoo:vit | w8a8 | top-1 % | 2 | 89.050 ± 0.071 |" in md
    assert "out of memory again" in md

    # run again: the 6 finished trials are kept, only the 2 failed ones run (and now pass)
    calls.clear()
    res = sw.sweep(SPEC, tmp_path / "o")
    assert sorted(calls) == sorted([broken, bad_input])
    assert len(res["skipped"]) == 6 and len(res["rows"]) == 8 and res["failures"] == {}
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["trial"] for r in rows] == [t["id"] for t in sw.expand(*sw.load_spec(SPEC))]


def test_a_finished_trial_with_other_settings_is_an_error(tmp_path, monkeypatch):
    _fake_runs(monkeypatch, {})
    sw.sweep({**SPEC, "models": ["zoo:vit"], "seeds": [0]}, tmp_path / "o")
    with pytest.raises(sw.SweepError, match=r"zoo-vit__w8a8__seed0 was run with other "
                       r"settings \(calib_size\); use another --out"):
        sw.sweep({**SPEC, "models": ["zoo:vit"], "seeds": [0], "calib_size": 64},
                 tmp_path / "o")
    res = sw.sweep({**SPEC, "models": ["zoo:vit"], "seeds": [0, 1]}, tmp_path / "o")
    assert len(res["skipped"]) == 2 and len(res["rows"]) == 4  # a grown grid keeps the old


def test_one_directory_one_sweep(tmp_path, monkeypatch):
    _fake_runs(monkeypatch, {})
    with sw._lock(tmp_path / "o"):
        with pytest.raises(sw.SweepError, match="another sweep is running"):
            sw.sweep(SPEC, tmp_path / "o")
    with pytest.raises(sw.SweepError, match="--address joins a Ray cluster"):
        sw.sweep(SPEC, tmp_path / "o2", address="auto")  # no Ray here (patched)


@pytest.mark.skipif(not weights_path("vit").is_file(), reason="zoo weights not trained")
def test_cli_sweep_on_ray_resumes_after_kill(tmp_path):
    """A real sweep (2 recipes × 2 seeds of zoo:vit) on a local Ray runtime: SIGKILL the
    driver once a trial has finished, run the same command again: the finished trials are
    not redone, the rest finish, the table has every trial."""
    pytest.importorskip("ray")
    (tmp_path / "s.yaml").write_text("name: vit\nmodels: [zoo:vit]\nrecipes: [w8a8, w4a8]\n"
                                     "seeds: [0, 1]\ncalib_size: 32\n")
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "slimtorch.cli", "sweep", str(tmp_path / "s.yaml"),
           "--out", str(out), "--workers", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while not list(out.glob("trials/*/metrics.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # Ray's workers end with their driver (a trial may finish meanwhile)
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")}
    assert 1 <= len(first) < 4
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(first)} finished earlier (kept); running the rest on ray" in done.stdout
    assert f"4 of 4 trials finished ({len(first)} from an earlier run), 0 failed" in done.stdout
    for tid, mtime in first.items():  # not redone
        assert (out / "trials" / tid / "metrics.json").stat().st_mtime_ns == mtime
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["q_top1"] > r["fp_top1"] - 1.5 for r in rows)
    assert all(r["threads"] == 1 for r in rows)  # cpus_per_trial threads in each worker
    # each trial ran in a worker of its own: its peak RSS is recorded (torch alone is >100 MB)
    assert all(100 < r["peak_rss_mb"] < 8000 for r in rows)
    # the float model was evaluated once and its outputs shared through the disk cache
    assert len(list(out.glob("float-outputs/zoo-vit__all__*.pt"))) == 1
    assert len({r["fp_top1"] for r in rows}) == 1
    assert "Over seeds" in (out / "results.md").read_text()


def test_float_outputs_are_computed_once_per_model_and_read_safely(tmp_path):
    """The sweep's disk cache of the float model's outputs: what one trial stores the next
    reads (tensors and dicts of them, weights_only); a broken file is computed again."""
    import torch
    cache = sw.FloatOutputs(tmp_path / "f", None)
    assert cache and cache.get("zoo:vit") is None  # truthy when empty: `fp_cache or {}`
    out = {"nll": torch.randn(3, 5), "mask": torch.ones(3, 5, dtype=torch.bool)}
    cache["zoo:vit"] = out
    again = sw.FloatOutputs(tmp_path / "f", None).get("zoo:vit")
    assert again.keys() == out.keys() and all(torch.equal(again[k], out[k]) for k in out)
    assert sw.FloatOutputs(tmp_path / "f", 100).get("zoo:vit") is None  # other eval size
    (f,) = (tmp_path / "f").glob("*.pt")
    f.write_bytes(b"not a tensor file")
    assert cache.get("zoo:vit") is None
