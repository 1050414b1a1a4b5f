"""Baseline PTQ table: zoo models × built-in recipes × seeds (round-to-nearest, MSE-p ranges).

Top-1 on the full Fashion-MNIST test set (10 000 images), calibration on a seeded subset of the
train split (one subset per seed), first and last layer at 8 bits (weights and input
activations). The grid runs as a ``slimtorch sweep`` (on a local Ray runtime, 1 thread per
trial; ``--serial`` without Ray), resumable: the trials' artifacts stay in ``--runs``. Prints a
markdown table (mean ± sample standard deviation over the seeds) and writes it to
bench/results/ptq_baseline.md (+ .json, every trial's metrics).

    python bench/ptq_baseline.py [--models resnet20 mobilenetv2 vit] [--recipes w8a8 ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.sweeps import sweep

RECIPES = ["w8a8", "w6a6", "w4a8", "w4a4", "w2a4", "w4a2", "w2a2"]
MODELS = ["resnet20", "mobilenetv2", "vit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--serial", action="store_true", help="no Ray: one trial after another")
    p.add_argument("--address", help="a Ray cluster to run the trials on")
    p.add_argument("--runs", default="runs/ptq_baseline", help="the sweep's directory")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq_baseline"))
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="re-render the table from rows saved by earlier runs (no quantizing)")
    args = p.parse_args()
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
        return write(rows, args)
    spec = {"name": "ptq_baseline", "models": [f"zoo:{m}" for m in args.models],
            "recipes": args.recipes, "seeds": args.seeds, "calib_size": args.calib_size,
            "cpus_per_trial": args.threads}
    import torch
    torch.set_num_threads(args.threads)  # the machine line says what each trial runs with
    machine = machine_markdown()
    res = sweep(spec, args.runs, serial=args.serial, address=args.address,
                workers=args.threads if args.serial else None,
                on_event=lambda kind, t, m: print(
                    f"{kind:6s} {t.get('id', '')} " + (
                        f"fp {m['fp_top1']:6.2f} q {m['q_top1']:6.2f}" if kind == "done"
                        else str(m)), flush=True))
    if res["failures"]:
        raise SystemExit(f"failed trials: {res['failures']}")
    rows = [{**m, "machine": machine} for m in res["rows"]]
    write(rows, args)


def write(rows: list[dict], args) -> None:
    md = to_markdown(rows)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), md + "\n")
    write_json_atomic(Path(args.out + ".json"), rows)


def to_markdown(rows: list[dict]) -> str:
    """One line per model × recipe: top-1 as the mean over its seeds ± the sample standard
    deviation (rows of one seed print the value alone)."""
    groups: dict[tuple, list[dict]] = {}
    for m in rows:
        groups.setdefault((m["model"], m["recipe"]), []).append(m)
    n_seeds = sorted({len(ms) for ms in groups.values()})
    head = (f"| model | recipe | FP top-1 % | quantized top-1 % (seeds: "
            f"{'/'.join(map(str, n_seeds))}) | Δ | FP size | quantized size | "
            "calibration s (median) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    setups = sorted({f"calibration {m['calib_size']} train images, "
                     f"{m['threads']} thread(s) per run" for m in rows})
    seeds = sorted({m["seed"] for m in rows})
    machines = sorted({m.get("machine", "machine not recorded") for m in rows})
    lines = [*machines, "", "; ".join(setups) + f"; seeds {', '.join(map(str, seeds))} (each "
             "its own calibration subset); first and last layer W8A8; top-1 on the full 10k "
             "test split.", "", head]
    for (model, recipe), ms in groups.items():
        q = [m["q_top1"] for m in ms]
        sd = f" ± {statistics.stdev(q):.2f}" if len(q) > 1 else ""
        fp, mean = ms[0]["fp_top1"], statistics.mean(q)
        lines.append(
            f"| {model.removeprefix('zoo:')} | {recipe} | {fp:.2f} | {mean:.2f}{sd} | "
            f"{mean - fp:+.2f} | {ms[0]['fp_size_bytes'] / 1e3:.0f} kB | "
            f"{ms[0]['q_size_bytes'] / 1e3:.0f} kB | "
            f"{statistics.median(m['calib_seconds'] for m in ms):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
