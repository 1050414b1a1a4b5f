"""Reconstruction PTQ table: zoo CNNs × bit widths × {RTN, AdaRound, BRECQ, QDrop, PD-Quant}
and other tools (AIMET AdaRound, NNCF, Brevitas) on the same models and calibration images.

Top-1 on the full Fashion-MNIST test set (10 000 images) through
``slimtorch.pipeline.run_quantize``; calibration on a seeded subset of the train split (default
1024 images, the seed is the row's seed); first/last layer W8A8 (the built-in recipes). Each row
runs in a child process (its peak RSS is its own) and is written at once to
``OUT/rows/MODEL_BITS_METHOD_sSEED.json``, so a killed run resumes where it stopped (rows on disk
are skipped) and ``--from-json`` re-renders the table without running anything. W2A2 rows run
for every ``--seeds`` seed (mean ± std), the other bit widths for the first seed only
(``--all-seeds-bits`` changes which). A cell with several seeds shows mean ± std. Our methods
run the built-in ``{bits}-{method}`` recipe (``w8a8-qdrop`` …), RTN the ``{bits}`` one — at W8A8
(not in the default run; NNCF's only setting) the deployable ``w8a8``.

    python bench/ptq_recon.py [--models resnet20 mobilenetv2] [--bits w4a4 w2a4 w4a2 w2a2 w8a8]
        [--methods rtn adaround brecq qdrop pdquant aimet nncf brevitas] [--seeds 0 1 2]
        [--threads 1] [--method-args '{"iters": 20000}'] [--from-json]
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

from slimtorch.export.artifact import write_json_atomic, write_text_atomic

MODELS = ["resnet20", "mobilenetv2"]
BITS = ["w8a8", "w4a4", "w2a4", "w4a2", "w2a2"]  # table order; runs take any built-in W?A?
OURS = ["rtn", "adaround", "brecq", "qdrop", "pdquant"]
PEERS = ["aimet", "nncf", "brevitas"]
OUT = Path(__file__).parent / "results" / "ptq_recon"


def one(model: str, bits: str, method: str, seed: int, a) -> dict:
    """One row, in this (child) process."""
    import torch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if method in PEERS:
        sys.path.insert(0, str(Path(__file__).parent))
        from peers_recon import run_peer
        m = run_peer(method, model, bits, seed, a.calib_size)
    else:
        from slimtorch.pipeline import run_quantize
        r = method_recipe(bits, method)
        if a.method_args and method != "rtn":
            r["methods"] = [{**m, **a.method_args} for m in r["methods"]]
        m, _ = run_quantize(f"zoo:{model}", r, calib_size=a.calib_size, seed=seed)
        m.pop("versions", None)
        m["per_unit"] = [u for s in m.pop("methods", []) for u in s["stats"].get("per_unit", [])]
    from slimtorch.eval.machine import machine_markdown
    return {**m, "model": model, "bits": bits, "method": method, "seed": seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "machine": machine_markdown(), "method_args": a.method_args}


def method_recipe(bits: str, method: str) -> dict:
    """The built-in ``{bits}-{method}`` recipe; where none ships (e.g. W6A6), the built-in
    ``{bits}`` RTN recipe with its method replaced."""
    from slimtorch.errors import RecipeError
    from slimtorch.recipe import load_builtin
    if method != "rtn":
        try:
            return load_builtin(f"{bits}-{method}").to_dict()
        except RecipeError:
            pass
    return {**load_builtin(bits).to_dict(), "methods": [method]}


def row_file(out: Path, model: str, bits: str, method: str, seed: int) -> Path:
    return out / "rows" / f"{model}_{bits}_{method}_s{seed}.json"


def run_row(model, bits, method, seed, a) -> dict:
    f = row_file(Path(a.out), model, bits, method, seed)
    if f.is_file():
        return json.loads(f.read_text())
    cmd = [sys.executable, __file__, "--one", model, bits, method, str(seed),
           "--calib-size", str(a.calib_size), "--threads", str(a.threads),
           "--method-args", json.dumps(a.method_args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        row = {"model": model, "bits": bits, "method": method, "seed": seed,
               "error": p.stderr.strip()[-3000:] or f"exit status {p.returncode}"}
    else:
        row = json.loads(p.stdout.strip().splitlines()[-1])
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, row)
    return row


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
        for model in a.models:
            for bits in a.bits:
                for method in a.methods:
                    for seed in (a.seeds if bits in a.all_seeds_bits else a.seeds[:1]):
                        row = run_row(model, bits, method, seed, a)
                        print(json.dumps({k: row.get(k) for k in (
                            "model", "bits", "method", "seed", "fp_top1", "q_top1",
                            "calib_seconds", "peak_rss_mb")} | (
                            {"error": row["error"].splitlines()[-1]} if "error" in row else {})),
                            flush=True)
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
    return *cells, f"{mins:.1f}", f"{max(r['peak_rss_mb'] for r in ok):.0f}"


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
