"""Reconstruction PTQ table: zoo CNNs × bit widths × {RTN, AdaRound, BRECQ, QDrop, PD-Quant}
and other tools (AIMET AdaRound, NNCF, Brevitas) on the same models and calibration images.

Top-1 on the full Fashion-MNIST test set (10 000 images) through
``slimtorch.pipeline.run_quantize``; calibration on a seeded subset of the train split (default
1024 images, the seed is the row's seed); first/last layer W8A8 (the built-in recipes). Our
methods run as ``slimtorch sweep`` grids (a local Ray runtime, two 1-thread trials at a time on
2 cores, each in a worker process of its own, so its peak RSS is its own; ``--serial``: one
after another, no RSS), resumable in ``--runs``; the other tools each in a child process. Every
row is written to ``OUT/rows/MODEL_BITS_METHOD_sSEED.json`` as it ends, so rows on disk are
skipped and ``--from-json`` re-renders the table without running anything. W2A2 rows run
for every ``--seeds`` seed (mean ± std), the other bit widths for the first seed only
(``--all-seeds-bits`` changes which). A cell with several seeds shows mean ± std. Our methods
run the built-in ``{bits}-{method}`` recipe (``w8a8-qdrop`` …), RTN the ``{bits}`` one — at W8A8
(not in the default run; NNCF's only setting) the deployable ``w8a8``.

    python bench/ptq_recon.py [--models resnet20 mobilenetv2] [--bits w4a4 w2a4 w4a2 w2a2 w8a8]
        [--methods rtn adaround brecq qdrop pdquant aimet nncf brevitas] [--seeds 0 1 2]
        [--threads 1] [--method-args '{"iters": 20000}'] [--runs DIR] [--serial] [--from-json]
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic

MODELS = ["resnet20", "mobilenetv2"]
BITS = ["w8a8", "w4a4", "w2a4", "w4a2", "w2a2"]  # table order; runs take any built-in W?A?
OURS = ["rtn", "adaround", "brecq", "qdrop", "pdquant"]
PEERS = ["aimet", "nncf", "brevitas"]
OUT = Path(__file__).parent / "results" / "ptq_recon"


def one(model: str, bits: str, method: str, seed: int, a) -> dict:
    """One row of another tool, in this (child) process."""
    import torch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).parent))
    from peers_recon import run_peer
    m = run_peer(method, model, bits, seed, a.calib_size)
    return {**m, "model": model, "bits": bits, "method": method, "seed": seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "machine": machine_markdown(), "method_args": a.method_args}


def method_recipe(bits: str, method: str, method_args: dict) -> dict:
    """The built-in ``{bits}-{method}`` recipe (where none ships, e.g. W6A6, the built-in
    ``{bits}`` RTN recipe with its method replaced), ``method_args`` merged into its methods,
    named ``{bits}-{method}``: one inline recipe of the sweep."""
    from slimtorch.errors import RecipeError
    from slimtorch.recipe import load_builtin
    r = None
    if method != "rtn":
        try:
            r = load_builtin(f"{bits}-{method}").to_dict()
        except RecipeError:
            pass
    r = r or {**load_builtin(bits).to_dict(), "methods": [method]}
    if method_args and method != "rtn":
        r["methods"] = [{**(m if isinstance(m, dict) else {"name": m}), **method_args}
                        for m in r["methods"]]
    return {**r, "name": f"{bits}-{method}"}


def run_ours(todo: list[tuple[str, str, str, int]], a) -> None:
    """Our rows ``todo`` (model, bits, method, seed) as sweeps — one per set of seeds, since a
    sweep is a full models × recipes × seeds grid — each row written as its trial ends."""
    import torch
    from slimtorch.sweeps import sweep
    torch.set_num_threads(a.threads)  # the machine line says what each trial runs with
    machine = machine_markdown()
    by_seeds: dict[tuple, set] = {}
    for model, bits, method, seed in todo:
        seeds = tuple(a.seeds if bits in a.all_seeds_bits else a.seeds[:1])
        by_seeds.setdefault(seeds, set()).add((model, bits, method))

    def on_event(kind: str, trial: dict, info: dict) -> None:
        if kind == "start":
            return print(f"sweep: {info}", flush=True)
        model, (bits, method) = trial["model"].removeprefix("zoo:"), trial["recipe_label"].split("-")
        if kind == "done":
            m = dict(info)
            m.pop("versions", None)
            m["per_unit"] = [u for s in m.pop("methods", []) for u in
                             s["stats"].get("per_unit", [])]
            row = {**m, "model": model, "bits": bits, "method": method, "seed": trial["seed"],
                   "machine": machine, "method_args": a.method_args}
        else:
            row = {"model": model, "bits": bits, "method": method, "seed": trial["seed"],
                   "error": info["error"]}
        if kind != "retry":
            save_row(row, a)

    for seeds, cells in by_seeds.items():
        models = [m for m in a.models if any(c[0] == m for c in cells)]
        recipes = [method_recipe(b, meth, a.method_args) for b in a.bits for meth in OURS
                   if any(c[1:] == (b, meth) for c in cells)]
        sweep({"name": "ptq_recon", "models": [f"zoo:{m}" for m in models], "recipes": recipes,
               "seeds": list(seeds), "calib_size": a.calib_size, "cpus_per_trial": a.threads},
              a.runs, serial=a.serial, workers=a.threads if a.serial else None,
              on_event=on_event)


def row_file(out: Path, model: str, bits: str, method: str, seed: int) -> Path:
    return out / "rows" / f"{model}_{bits}_{method}_s{seed}.json"


def save_row(row: dict, a) -> None:
    f = row_file(Path(a.out), row["model"], row["bits"], row["method"], row["seed"])
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, row)
    print(json.dumps({k: row.get(k) for k in (
        "model", "bits", "method", "seed", "fp_top1", "q_top1", "calib_seconds",
        "peak_rss_mb")} | ({"error": row["error"].splitlines()[-1]} if "error" in row else {})),
        flush=True)


def run_peer_row(model, bits, method, seed, a) -> None:
    """A row of another tool, in a child process of its own (its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--one", model, bits, method, str(seed),
           "--calib-size", str(a.calib_size), "--threads", str(a.threads),
           "--method-args", json.dumps(a.method_args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        row = {"model": model, "bits": bits, "method": method, "seed": seed,
               "error": p.stderr.strip()[-3000:] or f"exit status {p.returncode}"}
    else:
        row = json.loads(p.stdout.strip().splitlines()[-1])
    save_row(row, a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--bits", nargs="+", default=BITS[1:],
                   help="bit settings (any built-in recipe name W?A?; w8a8 is not in the "
                        "default run)")
    p.add_argument("--methods", nargs="+", default=OURS + PEERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--all-seeds-bits", nargs="+", default=["w2a2"], metavar="BITS",
                   help="bit settings that run every --seeds seed (others: the first seed)")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method-args", type=json.loads, default={},
                   help='JSON merged into the method settings of our methods, e.g. \'{"iters": 20000}\'')
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--runs", default="runs/ptq_recon", help="the sweeps' directory (trial "
                   "artifacts; resumable)")
    p.add_argument("--serial", action="store_true", help="our trials in this process, one "
                   "after another (no Ray)")
    p.add_argument("--from-json", action="store_true",
                   help="only re-render the table from the rows saved in OUT/rows")
    p.add_argument("--one", nargs=4, metavar=("MODEL", "BITS", "METHOD", "SEED"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(*a.one[:3], int(a.one[3]), a)))
        return
    if not a.from_json:
        for bad in set(a.methods) - set(OURS + PEERS):
            p.error(f"unknown method {bad!r}; choose from {OURS + PEERS}")
        todo = [(model, bits, method, seed) for model in a.models for bits in a.bits
                for method in a.methods
                for seed in (a.seeds if bits in a.all_seeds_bits else a.seeds[:1])
                if not row_file(Path(a.out), model, bits, method, seed).is_file()]
        run_ours([t for t in todo if t[2] in OURS], a)
        for t in todo:
            if t[2] in PEERS:
                run_peer_row(*t, a)
    rows = [json.loads(f.read_text()) for f in sorted((Path(a.out) / "rows").glob("*.json"))]
    md = to_markdown(rows)
    print("\n" + md)
    write_text_atomic(Path(a.out + ".md"), md + "\n")


def _cell(rows: list[dict]) -> tuple[str, str, str, str]:
    """top-1, top-1 agreement with the float model, calibration minutes, peak RSS."""
    ok = [r for r in rows if "error" not in r and r.get("q_top1") is not None]
    if not ok:
        why = " ".join((rows[0].get("error") or "no result").strip().splitlines()[-1].split())
        return f"failed: {why[:110]}".replace("|", "/"), "", "", ""
    cells = []
    for key in ("q_top1", "q_top1_agreement"):
        v = [r[key] for r in ok if r.get(key) is not None]
        if len(v) > 1:
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} (n={len(v)})")
        else:
            cells.append(f"{v[0]:.2f}" if v else "")
    mins = statistics.mean(r["calib_seconds"] for r in ok) / 60
    rss = [r["peak_rss_mb"] for r in ok if r.get("peak_rss_mb") is not None]
    return *cells, f"{mins:.1f}", f"{max(rss):.0f}" if rss else ""


def _machines(rows: list[dict]) -> list[str]:
    """One line per machine; the load average at each row's start becomes a range."""
    pat = re.compile(r", load avg \(1 min\) at start ([0-9.]+)")
    loads: dict[str, list[float]] = {}
    for r in rows:
        if "machine" in r:
            m = pat.search(r["machine"])
            loads.setdefault(pat.sub("", r["machine"]), []).extend(
                [float(m.group(1))] if m else [])
    return [f"{k}; load avg (1 min) at row start {min(v):.1f}–{max(v):.1f}" if v else k
            for k, v in loads.items()]


def _peer_notes(rows: list[dict]) -> list[str]:
    seen = {}
    for r in rows:
        if r["method"] in PEERS:
            key = (r["method"], r["bits"])
            seen.setdefault(key, f"- {r['method']} {r['bits']}: " + (
                f"{r['tool_version']}: {r['setting']}" if "setting" in r
                else "failed: `" + " ".join(r["error"].strip().splitlines()[-1].split()) + "`"))
    return ["", "Other tools (same model, calibration images and test set):", *seen.values()
            ] if seen else []


def to_markdown(rows: list[dict]) -> str:
    machines = _machines(rows)
    setups = sorted({f"calibration {r['calib_size']} train images, {r['threads']} thread(s), "
                     f"method_args override {r.get('method_args') or 'none'}"
                     for r in rows if "calib_size" in r})
    lines = [*machines, "", "; ".join(setups) + "; first/last layer W8A8 (ours); top-1 on the "
             "full 10k test split (agreement: test images where the quantized model's top-1 class "
             "is the float model's); a cell with n > 1 is mean ± std over seeds (seed = calibration "
             "subset and method seed).", "",
             "| model | bits | method | FP top-1 % | top-1 % | agreement with FP % | calib min "
             "| peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    order = {k: i for i, k in enumerate(MODELS + BITS + OURS + PEERS)}
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 99), order.get(r["bits"], 99),
                                         order.get(r["method"], 99), r["seed"])):
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    for (model, bits, method), rs in groups.items():
        fp = next((r["fp_top1"] for r in rs if r.get("fp_top1") is not None), None)
        top, agree, mins, mem = _cell(rs)
        lines.append(f"| {model} | {bits} | {method} | {'' if fp is None else f'{fp:.2f}'} | "
                     f"{top} | {agree} | {mins} | {mem} |")
    return "\n".join(lines + _peer_notes(rows))


if __name__ == "__main__":
    main()
