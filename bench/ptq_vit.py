"""Vision-transformer PTQ table: zoo ``vit`` (top-1) and MiniLM (cosine, retrieval agreement)
× W8A8 / W6A6 / W4A4 × {RTN, PTQ4ViT, RepQ-ViT, RepQ-ViT + post-GELU}, with calibration minutes.

Zoo ``vit``: top-1 on the full Fashion-MNIST test set, calibration on a seeded subset of the
train split. MiniLM: near-duplicate retrieval top-1, cosine similarity and top-1 retrieval
agreement of its sentence embeddings with the float model on the project's text (1000 Jane Austen
eval sentences and their near-duplicates, ``data.text.eval_pairs``), calibration on the "calib"
split. First and last layer at 8 bits in every recipe. RTN rows use the built-in ``w{b}a{b}``
recipes; PTQ4ViT uses its default 32 calibration items (of the calibration set), RepQ-ViT the
whole calibration set. "RepQ-ViT + post-GELU" is the ``repq`` recipe with
``methods: [{name: repq, reparam_gelu: true}]`` — our extension, not the published method. Writes
bench/results/ptq_vit.md (+ .json).

    python bench/ptq_vit.py [--models vit minilm] [--bits 8 6 4] [--methods rtn ptq4vit repq
                            repq_gelu] [--threads 1] [--from-json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.pipeline import run_quantize
from slimtorch.recipe import Recipe, load_builtin

SOURCES = {"vit": "zoo:vit", "minilm": "minilm"}
METHOD_NAMES = {"rtn": "RTN", "ptq4vit": "PTQ4ViT", "repq": "RepQ-ViT",
                "repq_gelu": "RepQ-ViT + post-GELU (ext.)"}


def recipe_for(method: str, bits: int):
    """A built-in recipe name, or (for the extension row) the repq recipe with its flag on."""
    if method == "rtn":
        return f"w{bits}a{bits}"
    if method == "repq_gelu":
        d = load_builtin(f"vit-w{bits}a{bits}-repq").to_dict()
        d["methods"] = [{**e, "reparam_gelu": True} for e in d["methods"]]
        return Recipe.from_dict(d)
    return f"vit-w{bits}a{bits}-{method}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=list(METHOD_NAMES))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq_vit"))
    p.add_argument("--from-json", action="store_true",
                   help="rebuild OUT.md from OUT.json without running anything")
    args = p.parse_args()
    if args.from_json:  # keep the machine line the run recorded
        md = Path(args.out + ".md")
        first = md.read_text().splitlines()[0] if md.is_file() else ""
        write(json.loads(Path(args.out + ".json").read_text()), args,
              first if first.startswith("Machine:") else None)
        return
    torch.set_num_threads(args.threads)
    rows, fp_cache = [], {}
    for model in args.models:
        for bits in args.bits:
            for method in args.methods:
                t0 = time.perf_counter()
                try:
                    m, _ = run_quantize(SOURCES[model], recipe_for(method, bits),
                                        calib_size=args.calib_size, seed=args.seed,
                                        fp_cache=fp_cache)
                except Exception as e:  # e.g. zoo weights not trained yet: say so in the table
                    m = {"model": SOURCES[model], "error": f"{type(e).__name__}: {e}"}
                m.update(bits=bits, method_name=METHOD_NAMES[method],
                         wall_seconds=round(time.perf_counter() - t0, 1))
                for s in m.get("methods", []):
                    s.pop("stats", None)  # keep the resolved settings, not the per-unit stats
                rows.append(m)
                print(json.dumps({k: m.get(k) for k in ("model", "bits", "method_name",
                      "q_top1", "q_cosine", "q_retrieval_agreement", "calib_seconds",
                      "error")}), flush=True)
                write(rows, args)  # after every row, so a partial run leaves a table
    print("\n" + to_markdown(rows, args))


def write(rows: list[dict], args, machine: str | None = None) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), to_markdown(rows, args, machine) + "\n")
    write_json_atomic(Path(args.out + ".json"), rows)


def to_markdown(rows: list[dict], args, machine: str | None = None) -> str:
    """One row per run: top-1 (zoo ``vit``: test accuracy; MiniLM: near-duplicate retrieval
    accuracy on the paired eval set), and for MiniLM the cosine to the float embeddings and the
    top-1 retrieval agreement with the float model."""
    head = machine or (machine_markdown() + f"; calibration set {args.calib_size} items, "
                       f"seed {args.seed}; first/last layer W8A8.")
    lines = [head, "",
             "| model | bits | method | FP top-1 % | top-1 % | Δ | cosine to FP | "
             "retrieval agreement % | calibration min |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        name = m["model"].removeprefix("zoo:")
        head = f"| {name} | W{m['bits']}A{m['bits']} | {m['method_name']} "
        if "error" in m:
            lines.append(head + f"| — | — | not run: {m['error'][:80]} | — | — | — |")
            continue
        cos = f"{m['q_cosine']:.4f}" if m.get("q_cosine") is not None else "—"
        agree = (f"{m['q_retrieval_agreement']:.1f}"
                 if m.get("q_retrieval_agreement") is not None else "—")
        lines.append(head + f"| {m['fp_top1']:.2f} | {m['q_top1']:.2f} | "
                     f"{m['q_top1'] - m['fp_top1']:+.2f} | {cos} | {agree} | "
                     f"{m['calib_seconds'] / 60:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
