"""Reconstruction PTQ table: zoo CNNs × bit widths × {RTN, AdaRound, BRECQ, QDrop, PD-Quant}.

Top-1 on the full Fashion-MNIST test set (10 000 images) through
``slimtorch.pipeline.run_quantize``; calibration on a seeded subset of the train split (default
1024 images); first/last layer W8A8 (the built-in recipes). Each run is a subprocess so its peak
RSS is its own. W2A2 rows: mean ± std over ``--w2a2-seeds`` seeds. Other tools (AIMET AdaRound,
NNCF, Brevitas) are tried on the same model and calibration images where importable; failures are
recorded verbatim. Writes bench/results/ptq_recon.{md,json}.

    python bench/ptq_recon.py [--models resnet20 mobilenetv2] [--bits w4a4 w2a4 w4a2 w2a2]
                              [--methods rtn adaround brecq qdrop pdquant] [--iters N]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

MODELS = ["resnet20", "mobilenetv2"]
BITS = ["w4a4", "w2a4", "w4a2", "w2a2"]
METHODS = ["rtn", "adaround", "brecq", "qdrop", "pdquant"]
WEIGHTS = Path(__file__).parents[1] / "src" / "slimtorch" / "zoo" / "weights"


def one(model: str, recipe: str, seed: int, calib: int, threads: int, args: dict) -> dict:
    """Run in this process (called in a child): quantize, evaluate, report peak RSS."""
    import torch
    from slimtorch.pipeline import run_quantize
    from slimtorch.recipe import load_builtin
    torch.set_num_threads(threads)
    r = load_builtin(recipe).to_dict()
    if args and r["method"] != "rtn":
        r["method_args"] = {**r["method_args"], **args}
    m, _ = run_quantize(f"zoo:{model}", r, calib_size=calib, seed=seed)
    m.pop("versions", None)
    m["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return m


def child(model, recipe, seed, a) -> dict:
    cmd = [sys.executable, __file__, "--one", model, recipe, str(seed), "--calib-size",
           str(a.calib_size), "--threads", str(a.threads), "--method-args",
           json.dumps(a.method_args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"model": model, "recipe": recipe, "seed": seed, "error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def peers(model: str) -> list[dict]:
    """Other tools: record what imports and any failure verbatim."""
    out = []
    for tool, mod in (("AIMET (aimet-torch, AdaRound)", "aimet_torch"), ("NNCF", "nncf"),
                      ("Brevitas", "brevitas")):
        try:
            __import__(mod)
            out.append({"tool": tool, "model": model,
                        "status": "importable; comparison not implemented in this script yet"})
        except Exception:
            out.append({"tool": tool, "model": model,
                        "status": traceback.format_exc().strip().splitlines()[-1]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--bits", nargs="+", default=BITS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--w2a2-seeds", type=int, default=3)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method-args", type=json.loads, default={},
                   help='JSON merged into method_args, e.g. \'{"iters": 20000}\'')
    p.add_argument("--one", nargs=3, metavar=("MODEL", "RECIPE", "SEED"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq_recon"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.calib_size, a.threads,
                             a.method_args)))
        return
    rows, peer_rows = [], []
    for model in a.models:
        if not (WEIGHTS / f"{model}.safetensors").is_file():
            print(f"skip {model}: no trained weights in {WEIGHTS}", flush=True)
            continue
        peer_rows += peers(model)
        for bits in a.bits:
            for method in a.methods:
                recipe = bits if method == "rtn" else f"{bits}-{method}"
                for seed in range(a.w2a2_seeds if bits == "w2a2" else 1):
                    m = child(model, recipe, seed, a)
                    rows.append({**m, "bits": bits, "method": method})
                    print(json.dumps({k: m.get(k) for k in (
                        "model", "recipe", "seed", "fp_top1", "q_top1", "calib_seconds",
                        "peak_rss_mb", "error")}), flush=True)
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out + ".json").write_text(json.dumps(
                        {"rows": rows, "peers": peer_rows}, indent=1))
    md = to_markdown(rows, peer_rows, a)
    print("\n" + md)
    Path(a.out + ".md").write_text(md + "\n")


def to_markdown(rows: list[dict], peer_rows: list[dict], a) -> str:
    from slimtorch.eval.machine import machine_markdown
    lines = [machine_markdown() + f"; calibration {a.calib_size} train images; first/last "
             f"layer W8A8; {a.threads} threads; method_args override {a.method_args or 'none'}.",
             "", "| model | bits | method | FP top-1 % | top-1 % | calib min | peak MB |",
             "|---|---|---|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    for (model, bits, method), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {model} | {bits} | {method} | | failed: "
                         f"{rs[0]['error'].strip().splitlines()[-1]} | | |")
            continue
        acc = [r["q_top1"] for r in ok]
        top = (f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} (n={len(acc)})"
               if len(acc) > 1 else f"{acc[0]:.2f}")
        lines.append(f"| {model.removeprefix('zoo:')} | {bits} | {method} | "
                     f"{ok[0]['fp_top1']:.2f} | {top} | "
                     f"{statistics.mean(r['calib_seconds'] for r in ok) / 60:.1f} | "
                     f"{max(r['peak_rss_mb'] for r in ok):.0f} |")
    lines += ["", "| tool | model | status |", "|---|---|---|"]
    lines += [f"| {r['tool']} | {r['model']} | {r['status']} |" for r in peer_rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
