"""Mixed precision under a budget and Attention Round, on zoo ResNet-20 and MobileNetV2.

Per model: (1) per-layer sensitivity (``slimtorch sensitivity``: ΔKL per layer and bit width
on held calibration images with A8 activations, and the proxies' Spearman ρ with it); (2) at
average 3, 4 and 5 weight bits, with A8 and with A4 activations: uniform bits on *every* layer
(first and last too, so the size is the same) vs the DP allocation of each criterion (RTN), and
uniform vs the ``kl`` allocation with AdaRound; (3) Attention Round vs AdaRound at W4A8, W3A8,
W4A4 and W2A4 (built-in recipes, first/last layer 8 bits), the same iterations. The A4
allocations reuse the A8 sensitivity (weights measured one layer at a time, activations at 8).

Every row of (2) and (3) is one trial of a ``slimtorch sweep`` (inline recipes; a local Ray
runtime, two 1-thread trials at a time on 2 cores; resumable in ``--runs``). Top-1 on the full
Fashion-MNIST test set; calibration = 1024 train images of each seed. Writes
bench/results/mixed_precision_<model>.json; ``--render`` joins them into
bench/results/mixed_precision.md/.json.

    python bench/mixed_precision.py --model resnet20 [--iters 100] [--seeds 0] [--serial]
    python bench/mixed_precision.py --render
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from slimtorch.cli_mixed import run_sensitivity, sensitivity_markdown
from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.quant.allocate import allocate_from_sensitivity, mixed_recipe
from slimtorch.recipe import Recipe, resolve_recipe
from slimtorch.sweeps import sweep

RES = Path(__file__).parent / "results"
CRITERIA = ("kl", "hawq", "sqnr", "coding_length")
AVGS = (3, 4, 5)
ACTS = (8, 4)
# Attention Round vs AdaRound: (row, built-in base recipe)
ROUNDING = (("W4A8", "w4a8-attention-round"), ("W3A8", "w3a8-attention-round"),
            ("W4A4", "w4a4"), ("W2A4", "w2a4"))


def uniform(bits: int, acts: int, methods: list) -> Recipe:
    """w4a8 with every layer's weights at ``bits`` and activations at ``acts`` (first/last
    layer activations stay 8-bit)."""
    d = resolve_recipe("w4a8").to_dict()
    d.update(name=f"a{acts}-w{bits}-uniform", methods=methods,
             weights={**d["weights"], "bits": bits},
             activations={**d["activations"], "bits": acts},
             first_layer={"activations": 8}, last_layer={"activations": 8})
    return Recipe.from_dict(d)


def with_methods(name: str, methods: list, new_name: str) -> dict:
    d = resolve_recipe(name).to_dict()
    return {**d, "methods": methods, "name": new_name}


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def weight_bits(q) -> float:
    """Average bits of all Conv/Linear weights of the quantized model (float ones count 32)."""
    n = b = 0
    for m in q.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            wq = getattr(m, "weight_quantizer", None)
            n, b = n + m.weight.numel(), b + m.weight.numel() * (wq.spec.bits if wq else 32)
    return round(b / n, 3)


def grid(sens: dict, iters: int) -> list[tuple[dict, dict]]:
    """(row description, inline recipe) of every row."""
    rtn, ada = ["rtn"], [{"name": "adaround", "iters": iters}]
    ar = [{"name": "attention_round", "iters": iters}]
    rows = []
    for acts in ACTS:
        for avg in AVGS:
            for method, methods in (("RTN", rtn), ("AdaRound", ada)):
                base = uniform(avg, acts, methods)
                tag = f"a{acts}-w{avg}-{method.lower()}"
                rows.append(({"acts": acts, "budget": avg, "method": method,
                              "criterion": "uniform"}, {**base.to_dict(),
                                                        "name": f"{tag}-uniform"}))
                for crit in (CRITERIA if method == "RTN" else ("kl",)):
                    alloc = allocate_from_sensitivity(sens, avg_bits=avg, criterion=crit)
                    rec = mixed_recipe(base, alloc, name=f"{tag}-mixed-{crit}")
                    rows.append(({"acts": acts, "budget": avg, "method": method,
                                  "criterion": crit, "alloc_bits": round(alloc["avg_bits"], 3)},
                                 rec.to_dict()))
    for label, base in ROUNDING:
        for method, methods in (("AdaRound", ada), ("Attention Round", ar)):
            rows.append(({"rounding": label, "method": method},
                         with_methods(base, methods, f"{label.lower()}-"
                                      f"{method.lower().replace(' ', '-')}")))
    return rows


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = RES / f"mixed_precision_{args.model}.json"
    model = f"zoo:{args.model}"
    doc = {"model": model, "seeds": args.seeds, "iters": args.iters, "commit": commit(),
           "machine": machine_markdown(), "rows": [],
           "command": f"python bench/mixed_precision.py --model {args.model} --iters "
           f"{args.iters} --seeds {' '.join(map(str, args.seeds))}"}
    t0 = time.perf_counter()
    sens_file = Path(args.runs) / args.model / "sensitivity.json"
    if sens_file.is_file():  # a resumed run allocates from the sensitivity it measured
        sens = json.loads(sens_file.read_text())
    else:
        sens = run_sensitivity(model, bits=(2, 3, 4, 6, 8), calib_size=256, held_size=256,
                               seed=args.seeds[0], probes=2, hessian_samples=128,
                               out=sens_file.parent)
    doc["sensitivity"] = {"spearman": sens["spearman"], "baseline": sens["baseline"],
                          "seconds": round(time.perf_counter() - t0, 1),
                          "markdown": sensitivity_markdown(sens)}
    rows = grid(sens, args.iters)
    info = {r["name"]: d for d, r in rows}
    res = sweep({"name": f"mixed-{args.model}", "models": [model],
                 "recipes": [r for _, r in rows], "seeds": args.seeds, "calib_size": 1024,
                 "cpus_per_trial": args.threads}, Path(args.runs) / args.model,
                serial=args.serial, workers=args.threads if args.serial else None,
                on_event=lambda k, t, m: print(
                    f"{k:6s} {t.get('id', '')} " + (f"{m['q_top1']:6.2f}" if k == "done"
                                                    else str(m)), flush=True))
    import slimtorch
    for m in res["rows"]:
        q = slimtorch.load(Path(res["out"]) / "trials" / m["trial"])
        doc["rows"].append({**info[m["recipe_label"]], "recipe": m["recipe_label"],
                            "seed": m["seed"], "weight_bits": weight_bits(q),
                            **{k: m.get(k) for k in ("fp_top1", "q_top1", "q_size_bytes",
                                                     "calib_seconds", "peak_rss_mb")}})
    doc["failures"] = res["failures"]
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out, doc)
    print(f"{len(doc['rows'])} rows, {len(res['failures'])} failed -> {out}")


def _mean(rs: list[dict]) -> str:
    v = [r["q_top1"] for r in rs]
    return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")


def _groups(rows: list[dict], keys: tuple) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if all(k in r for k in keys):
            out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def render() -> None:
    docs = [json.loads(p.read_text()) for p in sorted(RES.glob("mixed_precision_*.json"))]
    docs = [d for d in docs if "seeds" in d]
    lines = ["# Mixed precision and Attention Round (bench/mixed_precision.py)", ""]
    for d in docs:
        seeds = ", ".join(map(str, d["seeds"]))
        lines += [f"## {d['model']}", "", f"{d['machine']}; commit {d['commit']}; seeds {seeds} "
                  f"(a cell over several is mean ± sd); reconstruction {d['iters']} iterations "
                  "per unit; calibration 1024 train images; top-1 on the 10 000 test images; "
                  f"every row one sweep trial (1 thread). Command: `{d['command']}`", "",
                  "### Sensitivity (ranges from 256 images, measured on 256 other images)", "",
                  d["sensitivity"]["markdown"], ""]
        fp = d["rows"][0]["fp_top1"] if d["rows"] else None
        budget = _groups(d["rows"], ("acts", "budget", "method", "criterion"))
        lines += ["### Accuracy at a budget", "", "Uniform: every layer's weights at the "
                  "budget's bits. Mixed: the DP allocation of the criterion over bits "
                  "{2, 3, 4, 6, 8} at the same budget. Gain: mixed − uniform top-1.", "",
                  "| activations | budget avg bits | method | allocation | weight bits "
                  "(measured) | top-1 % | gain | size bytes | calib s |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for (acts, avg, method, crit), rs in budget.items():
            uni = budget.get((acts, avg, method, "uniform"))
            gain = (statistics.mean(r["q_top1"] for r in rs)
                    - statistics.mean(r["q_top1"] for r in uni)) if uni else None
            gain_s = "" if crit == "uniform" or gain is None else f"{gain:+.2f}"
            lines.append(f"| A{acts} | {avg} | {method} | {crit} | {rs[0]['weight_bits']} | "
                         f"{_mean(rs)} | {gain_s} | {rs[0]['q_size_bytes']} | "
                         f"{statistics.median(r['calib_seconds'] for r in rs):.0f} |")
        lines += ["", "### Attention Round vs AdaRound", "",
                  "| bits | method | weight bits (measured) | top-1 % | calib s |",
                  "|---|---|---:|---:|---:|"]
        for (label, method), rs in _groups(d["rows"], ("rounding", "method")).items():
            lines.append(f"| {label} | {method} | {rs[0]['weight_bits']} | {_mean(rs)} | "
                         f"{statistics.median(r['calib_seconds'] for r in rs):.0f} |")
        lines += ["", f"Float top-1: {fp}."]
        if d.get("failures"):
            lines += ["", "Failed trials (verbatim):", *[f"- `{k}`: {v}" for k, v in
                                                        d["failures"].items()]]
        lines.append("")
    write_text_atomic(RES / "mixed_precision.md", "\n".join(lines) + "\n")
    write_json_atomic(RES / "mixed_precision.json", docs)
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", default="runs/mixed_precision", help="sweep directories "
                   "(RUNS/MODEL; resumable)")
    p.add_argument("--serial", action="store_true", help="no Ray: one trial after another")
    p.add_argument("--render", action="store_true")
    a = p.parse_args()
    render() if a.render else run(a)
