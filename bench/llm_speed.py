"""SmolLM2-135M prefill and decode speed in PyTorch: fp32 against the quantized forms that run
on integer / low-bit kernels here.

For each artifact (``--artifacts DIR ...`` written by ``slimtorch quantize --model
zoo:smollm2-135m``, or ``--recipes NAME ...`` quantized here with ``--calib-size`` segments):

* the form it runs in: weight-only layers on the packed int4/int8 CPU kernels
  (``intops.lower_packed``, bf16 activations), W8A8 layers on ``torch._int_mm``
  (``intops.lower_to_int8``) — ``slimtorch.lower``; layers left in fake quant are listed;
* prefill and decode tokens/s (``eval.decode_speed``, as ``slimtorch bench speed DIR``): one
  forward over a 128-token prompt; greedy generation of 128 new tokens after it;
* perplexity of the lowered model and of the fake-quant model on the first ``--eval-size``
  evaluation windows of the ``causal_lm`` task, so a kernel that breaks accuracy shows;
* bytes of the Linear weights as the kernels hold them.

Every engine runs in one process with ``--threads`` threads, taking turns round by round
(``--rounds``); each entry is the median over rounds of the median of ``--repeats`` runs.
Ratios are against fp32 measured in the same run.
Prints markdown and writes ``bench/results/llm_speed.md`` (+ .json).

    python bench/llm_speed.py [--artifacts DIR ...] [--recipes w4-rtn-g64 ...]
        [--prompt-tokens 128] [--new-tokens 128] [--threads 2] [--eval-size 4] [--out PREFIX]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from slimtorch import load
from slimtorch.eval.decode_speed import decode_speed, linear_weight_bytes
from slimtorch.eval.tasks import task_for
from slimtorch.intops import lower, lowering_summary
from slimtorch.pipeline import run_quantize, with_eval_size
from slimtorch.zoo.sources import load_model

from report import write  # bench/ is on sys.path when a bench script runs

MODEL = "zoo:smollm2-135m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", nargs="*", default=[], metavar="DIR")
    p.add_argument("--recipes", nargs="*", default=[])
    p.add_argument("--calib-size", type=int, default=16, help="512-token segments (--recipes)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-size", type=int, default=4, help="eval windows for the perplexity "
                   "check of each lowered model (0: skip)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm_speed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = task_for(MODEL)
    fp = load_model(MODEL)
    quantized: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            m, _ = run_quantize(MODEL, recipe, calib_size=args.calib_size,
                                out=Path(tmp) / Path(recipe).stem, eval_size=1)
            quantized[m["recipe"]] = load(Path(tmp) / Path(recipe).stem)
    made: dict[str, dict] = {}
    for d in args.artifacts:
        m = json.loads((Path(d) / "metrics.json").read_text())
        quantized[m["recipe"]] = load(d)
        made[m["recipe"]] = {"calib_size": m["calib_size"], "seed": m["seed"]}
    engines: dict[str, nn.Module] = {"fp32": fp}
    rows: dict[str, dict] = {"fp32": {"engine": "fp32", "form": "float32 PyTorch",
                                      "weight_mb": linear_weight_bytes(fp) / 1e6}}
    if args.eval_size:
        with_eval_size(task, args.eval_size)
        fp_out = task.outputs(fp)
        rows["fp32"]["ppl"] = task.score(fp_out)["ppl"]
    for name, q in quantized.items():
        low = lower(copy.deepcopy(q))
        s = lowering_summary(low)
        engines[name] = low
        row = {"engine": name, "form": f"{len(s['packed'])} packed, {len(s['int8'])} int8, "
               f"{len(s['fake_quant'])} fake-quant layers",
               "weight_mb": linear_weight_bytes(low) / 1e6, "fake_quant": s["fake_quant"]}
        if args.eval_size:
            row["ppl_fake_quant"] = task.score(task.outputs(q))["ppl"]
            row["ppl"] = task.score(task.outputs(low))["ppl"]
        rows[name] = {**row, **made.get(name, {"calib_size": args.calib_size, "seed": 0})}
        print(f"{name}: {row['form']}, ppl fake-quant {row.get('ppl_fake_quant')} lowered "
              f"{row.get('ppl')}", flush=True)
    prompt = task.inputs(1)[0]["input_ids"][:, :args.prompt_tokens]  # the first eval window
    for name, r in decode_speed(engines, prompt, new_tokens=args.new_tokens, rounds=args.rounds,
                                repeats=args.repeats).items():
        rows[name].update(r)
    base = rows["fp32"]
    for r in rows.values():
        r["decode_x"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_x"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r.update(threads=args.threads, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, eval_size=args.eval_size)
    write(list(rows.values()), args.out, to_markdown)


def to_markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    ppl = (f" Perplexity on the first {r0['eval_size']} evaluation windows (the fake-quant "
           "model beside the lowered one: the kernels must not change it)." if r0["eval_size"]
           else " No perplexity check in this run (--eval-size 0).")
    lines = [f"SmolLM2-135M, batch 1, {r0['threads']} threads: prefill of a {r0['prompt_tokens']}"
             f"-token prompt, greedy decode of {r0['new_tokens']} new tokens after it (KV "
             f"cache).{ppl}", "",
             "| engine | runs as | Linear weights MB | prefill tok/s | × | decode tok/s | × | "
             "ppl fake-quant | ppl lowered |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fq = r.get("ppl_fake_quant")
        lines.append(f"| {r['engine']} | {r['form']} | {r['weight_mb']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_x']:.2f} | {r['decode_tok_s']:.1f} "
                     f"| {r['decode_x']:.2f} | {'' if fq is None else f'{fq:.2f}'} | "
                     f"{r['ppl']:.2f} |" if "ppl" in r else
                     f"| {r['engine']} | {r['form']} | {r['weight_mb']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_x']:.2f} | {r['decode_tok_s']:.1f} "
                     f"| {r['decode_x']:.2f} | | |")
    made = sorted({(r["calib_size"], r["seed"]) for r in rows if "calib_size" in r})
    if made:
        lines += ["", "Quantized with `slimtorch quantize --model zoo:smollm2-135m --recipe NAME` "
                  "(the `-head4` / `-head-float` variants from bench/recipes/), calibration "
                  + ", ".join(f"{c} segments seed {s}" for c, s in made) + "."]
    still = {f["layer"] for r in rows for f in r.get("fake_quant", [])}
    if still:
        lines += ["", "Layers left in fake quant (float kernels): " + ", ".join(sorted(still))]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
