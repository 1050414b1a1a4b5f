"""Baseline PTQ table: zoo models × built-in recipes (round-to-nearest, MSE-p ranges).

Top-1 on the full Fashion-MNIST test set (10 000 images), calibration on a seeded subset of the
train split, first and last layer at 8 bits (weights and input activations). Prints a markdown
table and writes it to bench/results/ptq_baseline.md (+ .json).

    python bench/ptq_baseline.py [--models resnet20 mobilenetv2 vit] [--recipes w8a8 ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.pipeline import run_quantize

RECIPES = ["w8a8", "w6a6", "w4a8", "w4a4", "w2a4", "w4a2", "w2a2"]
MODELS = ["resnet20", "mobilenetv2", "vit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq_baseline"))
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="re-render the table from rows saved by earlier runs (no quantizing)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
        return write(rows, args)
    rows, fp_cache = [], {}
    for model in args.models:
        for recipe in args.recipes:
            m, _ = run_quantize(f"zoo:{model}", recipe, calib_size=args.calib_size,
                                seed=args.seed, fp_cache=fp_cache)
            rows.append(m)
            print(f"{model:12s} {recipe:5s} fp {m['fp_top1']:6.2f}  q {m['q_top1']:6.2f}  "
                  f"calib {m['calib_seconds']:6.1f}s", flush=True)
    for m in rows:
        m["machine"] = machine_markdown()
    write(rows, args)


def write(rows: list[dict], args) -> None:
    md = to_markdown(rows)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), md + "\n")
    write_json_atomic(Path(args.out + ".json"), rows)


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | recipe | FP top-1 % | quantized top-1 % | Δ | FP size | quantized size | "
            "calibration s |\n|---|---|---:|---:|---:|---:|---:|---:|")
    setups = sorted({f"calibration {m['calib_size']} train images, seed {m['seed']}, "
                     f"{m['threads']} thread(s)" for m in rows})
    machines = sorted({m.get("machine", "machine not recorded") for m in rows})
    lines = [*machines, "", "; ".join(setups) + "; first and last layer W8A8; top-1 on the "
             "full 10k test split.", "", head]
    for m in rows:
        lines.append(
            f"| {m['model'].removeprefix('zoo:')} | {m['recipe']} | {m['fp_top1']:.2f} | "
            f"{m['q_top1']:.2f} | {m['q_top1'] - m['fp_top1']:+.2f} | "
            f"{m['fp_size_bytes'] / 1e3:.0f} kB | {m['q_size_bytes'] / 1e3:.0f} kB | "
            f"{m['calib_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
