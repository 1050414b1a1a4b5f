"""Mixed precision under a budget and Attention Round, on zoo ResNet-20 and MobileNetV2.

Per model: (1) per-layer sensitivity (``slimtorch sensitivity``: ΔKL per layer and bit width
on held calibration images, and the proxies' Spearman ρ with it); (2) at average 3 and 4
weight bits (A8): uniform bits on *every* layer (first and last too, so the size is the same)
vs the DP allocation of each criterion, with RTN and with AdaRound; (3) Attention Round vs
AdaRound at W4A8 / W3A8 (built-in recipes, first/last layer 8 bits), the same iterations.
Top-1 on the full Fashion-MNIST test set; calibration = a seeded train subset. Rows are written
to bench/results/mixed_precision_<model>.json as they finish; ``--render`` joins them into
bench/results/mixed_precision.md/.json.

    python bench/mixed_precision.py --model resnet20 --threads 1 [--iters 100]
    python bench/mixed_precision.py --model resnet20 --threads 1 --iters 100 --a4
    python bench/mixed_precision.py --render
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from slimtorch.cli_mixed import run_sensitivity, sensitivity_markdown
from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.pipeline import run_quantize
from slimtorch.quant.allocate import allocate_from_sensitivity, mixed_recipe
from slimtorch.recipe import Recipe, resolve_recipe

RES = Path(__file__).parent / "results"
CRITERIA = ("kl", "hawq", "sqnr", "coding_length")


def uniform(bits: int, methods: list) -> Recipe:
    """w4a8 with every layer's weights at ``bits`` (first/last keep only their A8)."""
    d = resolve_recipe("w4a8").to_dict()
    d.update(name=f"uniform-w{bits}a8", methods=methods, weights={**d["weights"], "bits": bits},
             first_layer={"activations": 8}, last_layer={"activations": 8})
    return Recipe.from_dict(d)


def with_methods(name: str, methods: list) -> Recipe:
    d = resolve_recipe(name).to_dict()
    d["methods"] = methods
    return Recipe.from_dict(d)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def _doc(args, flag: str = "") -> dict:
    return {"model": f"zoo:{args.model}", "seed": args.seed, "iters": args.iters,
            "commit": commit(), "machine": machine_markdown(), "rows": [],
            "command": f"python bench/mixed_precision.py --model {args.model} --threads "
            f"{args.threads} --iters {args.iters}{flag}"}


def weight_bits(q) -> float:
    """Average bits of all Conv/Linear weights of the quantized model (float ones count 32)."""
    n = b = 0
    for m in q.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            wq = getattr(m, "weight_quantizer", None)
            n, b = n + m.weight.numel(), b + m.weight.numel() * (wq.spec.bits if wq else 32)
    return round(b / n, 3)


def _row(doc: dict, out: Path, cache: dict, label: str, recipe: Recipe, avg=None) -> None:
    """Quantize and evaluate one recipe; the row is appended and the file rewritten."""
    m, q = run_quantize(doc["model"], recipe, calib_size=1024, seed=doc["seed"], fp_cache=cache)
    doc["rows"].append({"label": label, "avg_bits": avg, "recipe": recipe.name,
                        "weight_bits": weight_bits(q),
                        "fp_top1": m["fp_top1"], "q_top1": m["q_top1"],
                        "q_size_bytes": m["q_size_bytes"], "calib_seconds": m["calib_seconds"],
                        "overrides": recipe.to_dict()["overrides"]})
    write_json_atomic(out, doc)
    print(f"{label:40s} {m['q_top1']:6.2f}  {m['calib_seconds']:.0f}s", flush=True)


def run_a4(args) -> None:
    """Attention Round vs AdaRound at W4A4 / W2A4 (built-in w4a4 / w2a4, first/last 8 bits)."""
    torch.set_num_threads(args.threads)
    out = RES / f"mixed_precision_{args.model}_a4.json"
    doc, cache = _doc(args, " --a4"), {}
    for base in ("w4a4", "w2a4"):
        for name in ("adaround", "attention_round"):
            _row(doc, out, cache, f"{base.upper()} {name}",
                 with_methods(base, [{"name": name, "iters": args.iters}]))


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = RES / f"mixed_precision_{args.model}.json"
    doc, cache = _doc(args), {}
    t0 = time.perf_counter()
    sens = run_sensitivity(doc["model"], bits=(2, 3, 4, 6, 8), calib_size=256, held_size=256,
                           seed=args.seed, probes=2, hessian_samples=128)
    doc["sensitivity"] = {"spearman": sens["spearman"], "baseline": sens["baseline"],
                          "seconds": round(time.perf_counter() - t0, 1),
                          "markdown": sensitivity_markdown(sens)}
    write_json_atomic(out, doc)
    ada = [{"name": "adaround", "iters": args.iters}]

    def row(label, recipe, avg=None):
        _row(doc, out, cache, label, recipe, avg)

    for avg in (3, 4):
        row(f"uniform W{avg} RTN", uniform(avg, ["rtn"]), avg)
        for crit in CRITERIA:
            alloc = allocate_from_sensitivity(sens, avg_bits=avg, criterion=crit)
            row(f"mixed {crit} RTN", mixed_recipe(uniform(avg, ["rtn"]), alloc),
                round(alloc["avg_bits"], 3))
    for avg in (3, 4):
        row(f"uniform W{avg} AdaRound", uniform(avg, ada), avg)
        alloc = allocate_from_sensitivity(sens, avg_bits=avg, criterion="kl")
        row("mixed kl AdaRound", mixed_recipe(uniform(avg, ada), alloc),
            round(alloc["avg_bits"], 3))
    ar = [{"name": "attention_round", "iters": args.iters}]
    for b in (4, 3):
        row(f"W{b}A8 AdaRound", with_methods(f"w{b}a8-attention-round", ada))
        row(f"W{b}A8 Attention Round", with_methods(f"w{b}a8-attention-round", ar))
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out, doc)


def render() -> None:
    docs = [json.loads(p.read_text()) for p in sorted(RES.glob("mixed_precision_*.json"))]
    a4 = {d["model"]: d for d in docs if d["command"].endswith("--a4")}
    docs = [d for d in docs if not d["command"].endswith("--a4")]
    lines = ["# Mixed precision and Attention Round (bench/mixed_precision.py)", ""]
    for d in docs:
        lines += [f"## {d['model']}", "", f"{d['machine']}; commit {d['commit']}; seed "
                  f"{d['seed']}; reconstruction {d['iters']} iterations per unit; calibration "
                  "1024 train images; top-1 on the 10 000 test images. Command: "
                  f"`{d['command']}`", "", "### Sensitivity (ranges from 256 images, measured "
                  "on 256 other images)", "", d["sensitivity"]["markdown"], "",
                  "### Accuracy at a budget (A8)", "",
                  "| row | budget avg bits | weight bits (measured) | top-1 % | size bytes | "
                  "calib s |", "|---|---:|---:|---:|---:|---:|"]
        fp = d["rows"][0]["fp_top1"] if d["rows"] else None
        for r in d["rows"]:
            avg = "" if r["avg_bits"] is None else r["avg_bits"]
            lines.append(f"| {r['label']} | {avg} | {r.get('weight_bits', '')} | "
                         f"{r['q_top1']:.2f} | {r['q_size_bytes']} | {r['calib_seconds']:.0f} |")
        lines += ["", f"Float top-1: {fp}.", ""]
        extra = a4.get(d["model"])
        if extra:
            lines += ["### Attention Round vs AdaRound at 4-bit activations", "",
                      f"Command: `{extra['command']}`; commit {extra['commit']}.", "",
                      "| row | top-1 % | calib s |", "|---|---:|---:|"]
            lines += [f"| {r['label']} | {r['q_top1']:.2f} | {r['calib_seconds']:.0f} |"
                      for r in extra["rows"]]
            lines.append("")
    write_text_atomic(RES / "mixed_precision.md", "\n".join(lines) + "\n")
    write_json_atomic(RES / "mixed_precision.json", docs)
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true")
    p.add_argument("--a4", action="store_true", help="AdaRound vs Attention Round at W4A4/W2A4")
    a = p.parse_args()
    render() if a.render else run_a4(a) if a.a4 else run(a)
