"""Sparse weights, one-shot: models × sparsity patterns × methods (magnitude, random, Wanda,
SparseGPT), on the model's own task.

CNNs (zoo ResNet-20, MobileNetV2): top-1 on the full Fashion-MNIST test set, agreement with the
dense model; calibration on a seeded subset of the train split (``--calib-size`` images;
magnitude and random read none, the graph is captured on one batch). First and last layer
dense (the methods' default). SmolLM2-135M: perplexity on the fixed Austen windows
(``bench/llm.py``'s task), every decoder Linear pruned, LM head dense. Random masks use the
same per-layer ratios (uniform here) — the floor every method must beat. Size = the
artifact's tensors: kept values + a 1-bit mask per weight of a pruned layer.

The SmolLM2 rows of bench/results/llm_sparsity.md, with the peers (torch.ao.pruning, torchao),
come from ``bench/llm.py --recipes bench/recipes/llm-*.yaml --peers ...``: the same task, with its
paired per-window columns; ``--models smollm2-135m`` here runs the same cells.

    python bench/sparsity.py [--models resnet20 mobilenetv2] [--patterns 50 70 90 2:4 4:8]
        [--methods magnitude random wanda sparsegpt] [--seeds 0 1 2] [--seed-patterns 50 2:4]
        [--recover EPOCHS] [--train-size N] [--from-json FILE ...] [--out PREFIX]
        (re-render only: --models --from-json FILE ...)

A method ``M-rd`` (``magnitude-rd``, ``sparsegpt-rd``, ...) runs M with per-layer ratios from the
rate-distortion DP (``allocation: rd``, unstructured patterns only; ``random-rd``: random masks at
those ratios, its floor). ``--seeds`` repeats the data-dependent methods (Wanda, SparseGPT, random) on other calibration
subsets for the patterns in ``--seed-patterns``; the table shows mean (min..max).
``--recover EPOCHS`` appends SR-STE recovery (``srste``, distilled from the dense model on the
train split, ``--train-size`` images; default all 60k) to every recipe: rows ``METHOD + srste``.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from slimtorch.pipeline import run_quantize

from report import add_saved_rows, commit, row_commits, saved_rows, write

MODELS = ["resnet20", "mobilenetv2"]
PATTERNS = ["50", "70", "90", "2:4", "4:8"]
METHODS = ["magnitude", "random", "wanda", "sparsegpt"]
SEEDED = {"random", "wanda", "sparsegpt"}
LLM = "smollm2-135m"


def recipe_for(model: str, method: str, pattern: str, recover: int | None = None) -> dict:
    """The one-method float-weight recipe of a grid cell (an LLM prunes its first layer too,
    as the SparseGPT/Wanda protocol does), with SR-STE recovery for ``recover`` epochs."""
    base, _, alloc = method.partition("-")  # "sparsegpt-rd": layer-adaptive ratios (rd DP)
    entry = {"name": base, **({"pattern": pattern} if ":" in pattern
                              else {"sparsity": int(pattern) / 100}),
             **({"allocation": alloc} if alloc else {})}
    if model == LLM:
        entry["dense_first"] = False
    methods = [entry] + ([{"name": "srste", "epochs": recover}] if recover else [])
    name = f"{pattern}-{method}" + (f"+srste{recover}" if recover else "")
    return {"name": name, "weights": None, "methods": methods}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--patterns", nargs="*", default=PATTERNS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--seed-patterns", nargs="*", default=["50", "2:4"])
    p.add_argument("--calib-size", type=int, default=None,
                   help="calibration samples (default: the task's, 1024 images / 16 segments)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recover", type=int, default=None,
                   help="append SR-STE recovery with this many epochs to every recipe")
    p.add_argument("--train-size", type=int, default=None,
                   help="training images for --recover (default: the whole train split)")
    add_saved_rows(p)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparsity"))
    args = p.parse_args()
    code_commit = commit()  # the code this process runs, read once at start
    torch.set_num_threads(args.threads)
    rows = saved_rows(args)
    fp_cache: dict = {}
    for model in args.models:
        calib = args.calib_size or (16 if model == LLM else 1024)
        for pattern in args.patterns:
            for method in args.methods:
                if method.endswith("-rd") and ":" in pattern:
                    continue  # rd spreads an unstructured sparsity; N:M has one ratio
                seeded = method.partition("-")[0] in SEEDED or method.endswith("-rd")
                seeds = (args.seeds if seeded and pattern in args.seed_patterns
                         else args.seeds[:1])
                for seed in seeds:
                    recipe = recipe_for(model, method, pattern, args.recover)
                    m, _ = run_quantize(source_of(model), recipe, calib_size=calib, seed=seed,
                                        fp_cache=fp_cache, train_size=(
                                            args.train_size if args.recover else None))
                    rows.append({**m, "commit": code_commit})
                    print(f"{model:12s} {pattern:4s} {method:10s} seed {seed} "
                          f"{_metric(m):>8s}  calib {m['calib_seconds']:6.1f}s", flush=True)
    write(rows, args.out, to_markdown)


def source_of(model: str) -> str:
    """A zoo name as its source (``vit`` → ``zoo:vit``); ``minilm`` and full sources as given."""
    return model if ":" in model or model == "minilm" else f"zoo:{model}"


def _metric(m: dict) -> str:
    for key, fmt in (("q_ppl", ".3f"), ("q_cosine", ".4f"), ("q_top1", ".2f")):
        if key in m:
            return format(m[key], fmt)
    raise KeyError("no task metric in the row")


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def _cell(ms: list[dict]) -> str:
    key, fmt = next((k, f) for k, f in (("q_ppl", ".2f"), ("q_cosine", ".4f"),
                                        ("q_top1", ".2f")) if k in ms[0])
    return _spread([m[key] for m in ms], fmt)


def to_markdown(rows: list[dict]) -> str:
    lines = ["One-shot sparsity; rows `+ srste N ep` add SR-STE recovery (N epochs on the train "
             "split, distilled from the dense model), the others none. Cells: top-1 % on the Fashion-MNIST test "
             "set (CNNs, ViT), perplexity on the 32 Austen windows (SmolLM2) or embedding "
             "cosine to dense (MiniLM; agreement: retrieval); mean (min..max) "
             "over calibration seeds where several ran. Pattern: % of the weights of each "
             "pruned layer set to zero (unstructured), or N:M along the input channels. "
             "Sizes: the artifact's tensors (kept fp32 values + 1 bit per weight). Rows ran "
             "at one thread with other jobs on the machine (calib s: wall time under load).",
             ""]
    for r in rows:
        r["sparse_method"], r["pattern"] = cell_of(r)
    for model in dict.fromkeys(r["model"] for r in rows):
        ms = [r for r in rows if r["model"] == model]
        patterns = sorted(dict.fromkeys(r["pattern"] for r in ms),
                          key=lambda p: (":" in p, [int(x) for x in p.split(":")]))
        methods = list(dict.fromkeys(r["sparse_method"] for r in ms))
        fp = ms[0]
        dense = (f"perplexity {fp['fp_ppl']:.3f}" if "fp_ppl" in fp else
                 "cells: embedding cosine to the dense model" if "q_cosine" in fp else
                 f"top-1 {fp['fp_top1']:.2f} %")
        lines += [f"**{model}** — dense {dense}, {fp['fp_size_bytes'] / 1e6:.3f} MB; "
                  f"calibration {fp['calib_size']} samples.", "",
                  "| method | " + " | ".join(_label(p) for p in patterns) + " |",
                  "|---|" + "---:|" * len(patterns)]
        for method in methods:
            cells = []
            for pattern in patterns:
                got = [r for r in ms if r["sparse_method"] == method and r["pattern"] == pattern]
                cells.append(_cell(got) if got else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "| pattern | sparsity of pruned layers % | of all Conv/Linear % | size MB "
                  "| agreement with dense % (best method) | calib s (SparseGPT) | SR-STE s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for pattern in patterns:
            got = [r for r in ms if r["pattern"] == pattern]
            best = max(got, key=_score)
            sp = best["sparsity"]
            sgpt = [r["calib_seconds"] for r in got if r["sparse_method"] == "sparsegpt"]
            srste = [m["stats"]["seconds"] for r in got for m in r["methods"]
                     if m["name"] == "srste"]
            agree = next(best[k] for k in ("q_top1_agreement", "q_token_agreement",
                                           "q_retrieval_agreement") if k in best)
            lines.append(f"| {_label(pattern)} | {100 * sp['sparsity_masked']:.1f} | "
                         f"{100 * sp['sparsity_all']:.1f} | {best['q_size_bytes'] / 1e6:.3f} | "
                         f"{agree:.2f} ({best['sparse_method']}) | "
                         f"{f'{statistics.median(sgpt):.0f}' if sgpt else '—'} | "
                         f"{f'{statistics.median(srste):.0f}' if srste else ''} |")
        lines.append("")
    note = row_commits(rows, key="recipe")
    return "\n".join(lines + ([note] if note else []))


def cell_of(row: dict) -> tuple[str, str]:
    """(method label, pattern) of a row, from the sparsity method it recorded: a one-method
    row is named by that method; a row whose recipe also quantizes by its recipe name."""
    rec = next((m for m in row["methods"] if m["name"] != "srste" and (
        m["config"].get("sparsity") is not None or m["config"].get("pattern") is not None)),
        None)  # the method that chose the masks (srste after it only keeps their counts)
    if rec is None:  # the method chose its own ratios (SAP): the sparsity it reached
        return row["recipe"], f"{round(100 * row['sparsity']['sparsity_masked'])}"
    cfg = rec["config"]
    pattern = cfg["pattern"] or f"{round(100 * cfg['sparsity'])}"
    name = rec["name"] + ("-rd" if cfg.get("allocation") == "rd" else "")
    recover = [m for m in row["methods"] if m["name"] == "srste"]
    if recover and len(row["methods"]) == 2:
        return f"{name} + srste {recover[0]['config']['epochs']} ep", pattern
    short = {f"{pattern}-{name}", f"llm-{pattern.replace(':', 'of')}-{name}"}
    label = name if row["recipe"] in short else row["recipe"]
    return label, pattern


def _score(r: dict) -> float:
    return -r["q_ppl"] if "q_ppl" in r else r.get("q_cosine", r.get("q_top1"))


def _label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{pattern} %"


if __name__ == "__main__":
    main()
