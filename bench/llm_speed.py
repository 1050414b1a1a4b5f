"""SmolLM2-135M prefill and decode speed in PyTorch: fp32 against the quantized forms that run
on integer / low-bit kernels here.

For each artifact (``--artifacts DIR ...`` written by ``slimtorch quantize --model
zoo:smollm2-135m``, or ``--recipes NAME ...`` quantized here with ``--calib-size`` segments):

* the form it runs in: weight-only layers on the packed int4/int8 CPU kernels
  (``intops.lower_packed``, bf16 activations), W8A8 layers on ``torch._int_mm``
  (``intops.lower_to_int8``) — ``slimtorch.lower``; layers left in fake quant are listed;
* prefill: tokens/s of one forward over a 128-token prompt (batch 1, KV cache on);
* decode: tokens/s of greedy generation of 128 new tokens after that prompt,
  (t(128 new) − t(1 new)) / 127, EOS ignored so every run decodes the same count;
* perplexity of the lowered model and of the fake-quant model on the first ``--eval-size``
  evaluation windows of the ``causal_lm`` task, so a kernel that breaks accuracy shows;
* bytes of the Linear weights as the kernels hold them.

Every engine runs in one process with ``--threads`` threads, taking turns round by round
(``--rounds``); each entry is the median over rounds of the median of ``--repeats`` runs.
Prints markdown and writes ``bench/results/llm_speed.md`` (+ .json).

    python bench/llm_speed.py [--artifacts DIR ...] [--recipes w4-rtn-g64 ...]
        [--prompt-tokens 128] [--new-tokens 128] [--threads 2] [--eval-size 4] [--out PREFIX]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from slimtorch import load
from slimtorch.eval.tasks import task_for
from slimtorch.intops import lower, lowering_summary
from slimtorch.intops.linear import IntLinear
from slimtorch.intops.packed import PackedLinear
from slimtorch.pipeline import run_quantize, with_eval_size
from slimtorch.zoo.sources import load_model

from report import write  # bench/ is on sys.path when a bench script runs

MODEL = "zoo:smollm2-135m"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear weights as the kernels read them (packed codes + scales, or float;
    a lowered layer also keeps the dequantised float ``weight`` for model code that reads it)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, (PackedLinear, IntLinear)):
            total += sum(b.numel() * b.element_size() for n, b in mod.named_buffers()
                         if n not in ("bias", "offset", "in_scale", "weight"))
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, rounds: int,
          repeats: int) -> dict[str, dict]:
    """Prefill and decode tokens/s of each model, the models taking turns round by round."""
    def generate(model, n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    def prefill(model):
        return lambda: model(prompt, use_cache=True)

    times: dict[str, dict[str, list]] = {k: {"prefill": [], "g1": [], "gn": []} for k in models}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            generate(model, 4)()
        for _ in range(rounds):
            for name, model in models.items():
                t = times[name]
                t["prefill"].append(median_seconds(prefill(model), repeats))
                t["g1"].append(median_seconds(generate(model, 1), repeats))
                t["gn"].append(median_seconds(generate(model, new_tokens), max(1, repeats // 3)))
    out = {}
    for name, t in times.items():
        pre, g1, gn = (statistics.median(t[k]) for k in ("prefill", "g1", "gn"))
        out[name] = {"prefill_tok_s": prompt.shape[1] / pre,
                     "decode_tok_s": (new_tokens - 1) / max(gn - g1, 1e-9),
                     "prefill_ms": 1e3 * pre, "decode_ms_per_token": 1e3 * (gn - g1)
                     / (new_tokens - 1)}
    return out


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
    for d in args.artifacts:
        quantized[json.loads((Path(d) / "metrics.json").read_text())["recipe"]] = load(d)
    engines: dict[str, nn.Module] = {"fp32": fp}
    rows: dict[str, dict] = {"fp32": {"engine": "fp32", "form": "float32 PyTorch",
                                      "weight_mb": weight_bytes(fp) / 1e6}}
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
               "weight_mb": weight_bytes(low) / 1e6, "fake_quant": s["fake_quant"]}
        if args.eval_size:
            row["ppl_fake_quant"] = task.score(task.outputs(q))["ppl"]
            row["ppl"] = task.score(task.outputs(low))["ppl"]
        rows[name] = row
        print(f"{name}: {row['form']}, ppl fake-quant {row.get('ppl_fake_quant')} lowered "
              f"{row.get('ppl')}", flush=True)
    prompt = task.inputs(1)[0]["input_ids"][:, :args.prompt_tokens]  # the first eval window
    for name, r in speed(engines, prompt, args.new_tokens, args.rounds, args.repeats).items():
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
    lines = [f"SmolLM2-135M, batch 1, {r0['threads']} threads: prefill of a {r0['prompt_tokens']}"
             f"-token prompt, greedy decode of {r0['new_tokens']} new tokens after it (KV "
             f"cache). Perplexity on the first {r0['eval_size']} evaluation windows (the "
             "fake-quant model beside the lowered one: the kernels must not change it).", "",
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
    still = {f["layer"] for r in rows for f in r.get("fake_quant", [])}
    if still:
        lines += ["", "Layers left in fake quant (float kernels): " + ", ".join(sorted(still))]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
