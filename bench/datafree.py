"""Data-free calibration vs real data vs Gaussian noise: zoo models × recipes × seeds, top-1 on
the full Fashion-MNIST test set.

Per model and seed, three calibration sets of the same size N (default 128) and shape:
``real`` — a seeded subset of the train split (``calibration_set(N, seed)``); ``data-free`` —
``slimtorch.data.synthetic.synthesize(model, shape, N, method="auto", seed=seed)``: ZeroQ BN
statistics on the CNNs, PSAQ-ViT v1 on the ViT, at their default steps; ``gaussian`` — N(0, 1)
noise of the same shape from the same seed (the synthesis starting point, not optimised). Each
set is made once per seed and calibrates every recipe (the built-in RTN recipes: first/last
layer W8A8). Rows go to OUT.json as they finish (``--from-json`` re-renders the table).

    python bench/datafree.py [--models resnet20 vit] [--recipes w8a8 w4a8 w4a4]
                             [--seeds 0 1 2] [--samples 128] [--threads 1] [--from-json]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import slimtorch
from slimtorch.data.fashion_mnist import calibration_set
from slimtorch.data.synthetic import synthesize
from slimtorch.eval.tasks import task_for
from slimtorch.export.artifact import write_json_atomic
from slimtorch.zoo.registry import get_entry
from slimtorch.zoo.sources import load_model

import report

SOURCES = ("real", "data-free", "gaussian")


def calibration_sets(model, name: str, n: int, seed: int, progress: bool) -> tuple[dict, dict]:
    """The three sets for one model and seed, and the data-free synthesis report."""
    shape = get_entry(name).input_shape
    info: dict = {}
    t0 = time.perf_counter()
    synthetic = synthesize(model, shape, n, seed=seed, progress=progress, report=info)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    gauss = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return {"real": calibration_set(n, seed), "data-free": synthetic, "gaussian": gauss}, info


def run(args) -> list[dict]:
    rows: list[dict] = []
    for name in args.models:
        model, task = load_model(f"zoo:{name}"), task_for(f"zoo:{name}")
        fp_out = task.outputs(model)
        fp_top1 = task.score(fp_out)["top1"]
        for seed in args.seeds:
            sets, info = calibration_sets(model, name, args.samples, seed, not args.quiet)
            print(f"{name} seed {seed}: {info['method']} synthesis {info['seconds']} s, final "
                  f"loss {info['final_loss']}", flush=True)
            for recipe in args.recipes:
                for source in SOURCES:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # self-check warnings: not run here
                        q = slimtorch.quantize(model, recipe, sets[source], seed=seed,
                                               self_check=False)
                    score = task.score(task.outputs(q), fp_out)
                    row = {"model": name, "recipe": recipe, "seed": seed, "source": source,
                           "samples": args.samples, "fp_top1": fp_top1, **score,
                           "commit": report.commit()}
                    if source == "data-free":
                        row["synthesis"] = info
                    rows.append(row)
                    print(f"  {recipe:8s} {source:9s} top-1 {score['top1']:.2f}", flush=True)
                    write_json_atomic(Path(args.out + ".json"), rows)
    return rows


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def to_markdown(rows: list[dict]) -> str:
    lines = ["Top-1 % on the full Fashion-MNIST test set (10k); N calibration samples for each "
             "of the three sets; mean over the seeds (per-seed values in brackets). "
             "Δ = data-free − real, data-free − gaussian.", "",
             "| model | float | bits | N | seeds | real | data-free | gaussian | Δ real | "
             "Δ gaussian |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    keys = dict.fromkeys((r["model"], r["recipe"]) for r in rows)
    for model, recipe in keys:
        got = {s: [r["top1"] for r in rows if (r["model"], r["recipe"], r["source"]) ==
                   (model, recipe, s)] for s in SOURCES}
        if not all(got.values()):
            continue
        m = {s: _mean(v) for s, v in got.items()}
        fp = next(r["fp_top1"] for r in rows if r["model"] == model)
        cell = lambda s: f"{m[s]:.2f} ({', '.join(f'{v:.2f}' for v in got[s])})"  # noqa: E731
        sel = [r for r in rows if (r["model"], r["recipe"], r["source"]) == (model, recipe,
                                                                            "real")]
        seeds = ", ".join(str(r["seed"]) for r in sel)
        lines.append(f"| {model} | {fp:.2f} | {recipe.upper()} | {sel[0]['samples']} | {seeds} | "
                     f"{cell('real')} | "
                     f"{cell('data-free')} | {cell('gaussian')} | "
                     f"{m['data-free'] - m['real']:+.2f} | {m['data-free'] - m['gaussian']:+.2f} |")
    synth = {(r["model"], r["seed"]): r["synthesis"] for r in rows if "synthesis" in r}
    lines += ["", "| model | seed | synthesis | steps | lr | batch | seconds | "
              "final loss per batch |",
              "|---|---:|---|---:|---:|---:|---:|---|"]
    for (model, seed), s in synth.items():
        lines.append(f"| {model} | {seed} | {s['method']} | {s['steps']} | {s['lr']} | "
                     f"{s['batch_size']} | {s['seconds']} | "
                     f"{', '.join(f'{v:.3g}' for v in s['final_loss'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vit"])
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8", "w4a4"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "datafree"))
    p.add_argument("--from-json", nargs="*", metavar="FILE",
                   help="re-render the table from saved rows instead of running")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json is None:
        report.write(run(args), args.out, to_markdown)
        return
    files = [Path(f) for f in (args.from_json or [args.out + ".json"])]
    rows = [r for f in files for r in json.loads(f.read_text())]
    # each run's own command and machine line (its .md beside the rows), above the table
    runs = [line for f in files if f.with_suffix(".md").is_file() and f.with_suffix(".md") !=
            Path(args.out + ".md") for line in f.with_suffix(".md").read_text().splitlines()[:2]]
    report.write(rows, args.out, lambda rs: "\n".join(
        (["Rows from these runs:", "", *[f"- {x}" for x in runs], ""] if runs else [])
        + [to_markdown(rs)]))


if __name__ == "__main__":
    main()
