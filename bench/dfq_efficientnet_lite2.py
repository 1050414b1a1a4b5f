"""DFQ (cross-layer equalisation + bias correction, ``algorithms/dfq.py``) in front of / after a
built-in recipe on EfficientNet-Lite2, scored like ``bench/efficientnet_lite2.py``.

Not wired into recipes yet: this script folds BN, equalises the conv pairs the QuantGraph
finds (ReLU6 kept exact with per-channel clip bounds 6 / s), quantizes with the recipe, then
corrects every layer's bias by E[(W_q - W) x] with E[x] the per-channel input mean of the
float (equalised) model on the calibration crops.

    python bench/dfq_efficientnet_lite2.py --recipe w8a8 [--no-cle] [--no-bc] [--calib-size 256]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from slimtorch.algorithms import dfq
from slimtorch.api import quantize
from slimtorch.eval.machine import machine_markdown
from slimtorch.eval.tasks import task_for
from slimtorch.graph.capture import capture
from slimtorch.graph.rewrite import fold_batchnorm, set_submodule
from slimtorch.zoo.sources import load_model

MODEL = "zoo:efficientnet_lite2"


def equalised(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, int]:
    """A BN-folded, cross-layer-equalised copy of ``model`` (same function); pairs count."""
    model = copy.deepcopy(model).eval()
    fold_batchnorm(model, capture(model, example).bn_folds)
    pairs = dfq.equalizable_pairs(capture(model, example))
    mods = [(model.get_submodule(a), model.get_submodule(b)) for a, b, _ in pairs]
    scales = dfq.equalize(mods, iters=20)
    for (_, _, act), s in zip(pairs, scales):
        if act is not None and isinstance(model.get_submodule(act), torch.nn.ReLU6):
            set_submodule(model, act, dfq.ChannelClamp(6.0 / s))
    return model, len(pairs)


@torch.no_grad()
def input_means(model: torch.nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Per-channel mean of every conv/linear input over ``batches``: {fqn: [I]}."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            def pre(mod, args, name=name):
                x = args[0]
                dims = [0] + list(range(2, x.dim()))  # all but the channel dim
                sums[name] = sums.get(name, 0) + x.mean(dims) / len(batches)
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        for b in batches:
            model(b)
    finally:
        for h in hooks:
            h.remove()
    return sums


def correct_biases(qmodel, float_model, means: dict[str, torch.Tensor]) -> int:
    for name, mean in means.items():
        dfq.correct_bias(qmodel.get_submodule(name), float_model.get_submodule(name).weight,
                         mean)
    return len(means)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w8a8")
    p.add_argument("--no-cle", action="store_true")
    p.add_argument("--no-bc", action="store_true")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--fp-cache", default="/tmp/slimtorch-effnet-fp.pt",
                   help="float logits on the evaluation crops (computed once)")
    p.add_argument("--out", help="append the result row (JSON lines) to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    task = task_for(MODEL)
    calib = task.calibration(args.calib_size, 0, 32)
    fp_model = load_model(MODEL)
    t0 = time.perf_counter()
    model, n_pairs = (copy.deepcopy(fp_model), 0) if args.no_cle else equalised(fp_model,
                                                                               calib[0][:1])
    qmodel = quantize(model, args.recipe, calib)
    n_bc = 0 if args.no_bc else correct_biases(qmodel, model, input_means(model, calib))
    seconds = time.perf_counter() - t0
    cache = Path(args.fp_cache)
    fp_out = torch.load(cache, weights_only=True) if cache.is_file() else task.outputs(fp_model)
    if not cache.is_file():
        torch.save(fp_out, cache)
    row = {"recipe": args.recipe, "cle_pairs": n_pairs, "bias_corrected_layers": n_bc,
           "calib_size": args.calib_size, "seconds": round(seconds, 1),
           **task.score(task.outputs(qmodel), fp_out), "machine": machine_markdown()}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
