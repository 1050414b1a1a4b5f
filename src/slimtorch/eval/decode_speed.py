"""Prefill and decode speed of causal LMs in PyTorch, batch 1 (``slimtorch bench speed DIR`` on
an LLM artifact, ``bench/llm_speed.py``).

* prefill: tokens/s of one forward over the prompt (KV cache on);
* decode: tokens/s of greedy generation of ``new_tokens`` after it,
  (t(new_tokens) − t(1)) / (new_tokens − 1), with EOS ignored (``min_new_tokens``) so every
  run decodes the same count.

The models take turns round by round (``rounds``); each figure is the median over rounds of the
median of ``repeats`` runs, so a burst of other load on the machine hits one round of every
model rather than all runs of one.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(models: dict[str, nn.Module], prompt: torch.Tensor, *, new_tokens: int = 128,
                 rounds: int = 3, repeats: int = 3) -> dict[str, dict[str, float]]:
    """{name: prefill/decode tokens/s and ms} of each model on ``prompt`` [1, T]."""
    if new_tokens < 2:
        from ..errors import SlimtorchError
        raise SlimtorchError(f"decode speed needs at least 2 new tokens, got {new_tokens}")

    def generate(model, n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    times = {k: {"prefill": [], "g1": [], "gn": []} for k in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            generate(model, 4)()
        for _ in range(rounds):
            for name, model in models.items():
                t = times[name]
                t["prefill"].append(_median_seconds(lambda: model(prompt, use_cache=True),
                                                    repeats))
                t["g1"].append(_median_seconds(generate(model, 1), repeats))
                t["gn"].append(_median_seconds(generate(model, new_tokens),
                                               max(1, repeats // 3)))
    out = {}
    for name, t in times.items():
        pre, g1, gn = (statistics.median(t[k]) for k in ("prefill", "g1", "gn"))
        per_token = max(gn - g1, 1e-9) / (new_tokens - 1)
        out[name] = {"prefill_tok_s": prompt.shape[1] / pre, "decode_tok_s": 1 / per_token,
                     "prefill_ms": 1e3 * pre, "decode_ms_per_token": 1e3 * per_token}
    return out


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear weights as the kernels read them: packed codes + scales of lowered
    layers (not the dequantised ``weight`` they keep for model code that reads it), float
    weights of the others (a tied matrix counted once)."""
    from ..intops import IntLinear, PackedLinear
    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, (PackedLinear, IntLinear)):
            total += sum(b.numel() * b.element_size() for n, b in mod.named_buffers()
                         if n not in ("bias", "offset", "in_scale", "weight"))
        elif isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def measure_decode(directory: str | Path, *, threads: int = 2, prompt_tokens: int = 128,
                   new_tokens: int = 128, rounds: int = 3, repeats: int = 3) -> dict[str, Any]:
    """fp32 against the lowered artifact (``slimtorch.lower``: int8 / packed low-bit kernels),
    on the first ``prompt_tokens`` tokens of the task's first evaluation window."""
    from ..errors import SlimtorchError
    from ..export.artifact import load, read_config
    from ..intops import lower, lowering_summary
    from ..zoo.sources import load_model
    from .machine import torch_threads
    from .tasks import task_for
    source = read_config(directory).get("source")
    task = task_for(source)
    prompt = task.inputs(1)[0]["input_ids"][:, :prompt_tokens]
    if prompt.shape[1] < prompt_tokens:
        raise SlimtorchError(f"--prompt-tokens {prompt_tokens} is longer than the task's "
                             f"windows ({prompt.shape[1]} tokens)")
    fp = load_model(source)
    q = lower(copy.deepcopy(load(directory)))
    summary = lowering_summary(q)
    with torch_threads(threads):
        speed = decode_speed({"fp32": fp, "lowered": q}, prompt, new_tokens=new_tokens,
                             rounds=rounds, repeats=repeats)
    return {"model": source, "threads": threads, "prompt_tokens": prompt.shape[1],
            "new_tokens": new_tokens, "speed": speed,
            "linear_weight_bytes": {"fp32": linear_weight_bytes(fp),
                                    "lowered": linear_weight_bytes(q)},
            "lowered": {k: len(v) for k, v in summary.items()},
            "fake_quant": summary["fake_quant"]}
