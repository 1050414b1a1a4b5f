"""Structured pruning of a zoo CNN (ResNet-20 or MobileNetV2, Fashion-MNIST) to a MACs target:
ours (magnitude, Taylor, random; each also with the rate-distortion allocation, ``-rd``; and
``lowrank``, SVD factorisation) vs Torch-Pruning 1.6.1 (MetaPruner with its GroupMagnitude /
GroupTaylor / Random importance), one-shot and after the same recovery budget (KD from the float model,
``slimtorch.prune.recover``, the same loop and data for every row), accuracy on the full test
set, params, MACs (Conv/Linear, our count from the captured graph for every row), onnxruntime
fp32 latency at batch 64 (dense vs pruned, median of interleaved rounds).

    python bench/prune.py [--model zoo:resnet20] [--targets 0.5] [--epochs 1] [--threads 1]
        [--latency-threads 2] [--criteria magnitude taylor random magnitude-rd lowrank hesso]
        [--peers] [--seed 0 | --seeds 0 1 2] [--out PREFIX]

Rows are appended to PREFIX.json after each run (a crash loses at most one row); the table
(PREFIX.md) is re-rendered from the JSON each time.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import slimtorch
from slimtorch.cli_deploy import _onnx_runner, deploy_inputs, interleaved_ms
from slimtorch.eval.machine import machine_markdown, torch_threads
from slimtorch.eval.tasks import task_for
from slimtorch.export.onnx import export_onnx
from slimtorch.export.runtime import get_runtime
from slimtorch.graph.capture import capture
from slimtorch.methods import MethodContext
from slimtorch.prune import pruning_record
from slimtorch.prune.recover import RecoverConfig
from slimtorch.prune.recover import apply as recover
from slimtorch.prune.surgery import count_macs
from slimtorch.zoo.sources import load_model



def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def top1(task, model) -> float:
    return task.score(task.outputs(model))["top1"]


def latency_ms(models: dict, threads: int, source: str) -> dict[str, float]:
    """onnxruntime fp32 batch-64 median ms of each model, measured interleaved (the dense
    model next to every pruned one, so load on the shared machine hits both alike)."""
    item = deploy_inputs(source, 64)
    with tempfile.TemporaryDirectory() as tmp, torch_threads(threads):
        runners = {}
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, deploy_inputs(source, 2), opset=17, threads=threads)
            runners[name] = _onnx_runner(get_runtime("onnxruntime"), path, item, threads)
        got = interleaved_ms(runners, rounds=5, repeats=40)
        return {k: round(v, 3) for k, v in got.items()}


def ours(fp, task, calib, train, crit: str, target: float, epochs: int, seed: int, progress):
    """``crit`` is a criterion, CRITERION-rd for the rate-distortion allocation, lowrank
    (SVD factorisation, ranks by the DP) or hesso (prunes while it trains: its own ``epochs``
    of KD are the whole budget, no recover after it; no one-shot score)."""
    base, rd = crit.removesuffix("-rd"), crit.endswith("-rd")
    first = ({"name": "lowrank", "target": {"macs": target}} if crit == "lowrank" else
             {"name": "hesso", "target": {"macs": target}, "epochs": epochs}
             if crit == "hesso" else
             {"name": "prune", "criterion": base, "target": {"macs": target},
              "allocation": "rd" if rd else "global"})
    recipe = {"name": f"macs-{target}-{crit}", "weights": None, "methods": [first] + (
        [] if crit == "hesso" else [{"name": "recover", "epochs": epochs}])}
    seen = {}

    def on_method(name, model):
        if name in ("prune", "lowrank"):
            was = model.training
            seen["oneshot"] = top1(task, model.eval())
            model.train(was)
        return {}
    t0 = time.perf_counter()
    model = slimtorch.prune(fp, recipe, calib, train_data=train, seed=seed, progress=progress,
                            on_method=on_method, self_check=False)
    rec = pruning_record(model)
    sel = rec.get("selection", {})
    extra = {"distortion": sel["distortion_measured"],
             "global_ranking_distortion": sel["global_ranking_distortion"]} if rd else {}
    return model, {"oneshot_top1": seen.get("oneshot"), "pruned_seconds": rec["seconds"], **extra,
                   "seconds": round(time.perf_counter() - t0, 1)}


def tp_prune(fp, calib, crit: str, target: float, seed: int):
    """Torch-Pruning's MetaPruner, global pruning, the classifier ignored, channels rounded to
    8 as ours; iterative steps of 1 % of channels until our MACs count is at the target."""
    import torch_pruning as tp
    torch.manual_seed(seed)
    model = copy.deepcopy(fp).eval()
    example = calib[0][:2]
    imp = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2),
           "taylor": tp.importance.GroupTaylorImportance(),
           "random": tp.importance.RandomImportance()}[crit]
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.9,
                                  iterative_steps=90, global_pruning=True, round_to=8,
                                  ignored_layers=last)
    base = count_macs(model, capture(model, example))
    for _ in range(90):
        if crit == "taylor":
            model.zero_grad()
            for x in calib[:4]:  # a few batches per step (ours: all, once)
                out = model(x)
                F.cross_entropy(out, out.detach().argmax(1)).backward()
        pruner.step()
        if count_macs(model, capture(model, example)) / base <= target:
            break
    model.zero_grad()
    return model


def run_row(args, fp, task, calib, train, tool, crit, target) -> dict:
    row = {"tool": tool, "criterion": crit, "target_macs": target, "epochs": args.epochs,
           "seed": args.seed}
    t0 = time.perf_counter()
    if tool == "slimtorch":
        model, extra = ours(fp, task, calib, train, crit, target, args.epochs, args.seed,
                            not args.quiet)
        row.update(extra)
    else:
        model = tp_prune(fp, calib, crit, target, args.seed)
        row["oneshot_top1"] = top1(task, model.eval())
        ctx = MethodContext(None, calib, args.seed, not args.quiet, fp, None, train)
        recover(model, RecoverConfig(epochs=args.epochs), ctx)
        row["seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    example = calib[0][:2]
    row["macs"] = count_macs(model, capture(model, example))
    row["params"] = params(model)
    row["top1"] = top1(task, model)
    lat = latency_ms({"dense": fp, "pruned": model}, args.latency_threads, args.model)
    row["latency_ms_b64"], row["dense_ms_b64"] = lat["pruned"], lat["dense"]
    row["speedup"] = round(lat["dense"] / lat["pruned"], 3)
    row["macs_reduction"] = round(dense_macs(fp, example) / row["macs"], 3)
    return row


def dense_macs(fp, example) -> float:
    return count_macs(fp, capture(fp, example))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:resnet20", help="zoo:resnet20 | zoo:mobilenetv2")
    p.add_argument("--targets", nargs="*", type=float, default=[0.5])
    p.add_argument("--criteria", nargs="*", default=["magnitude", "taylor", "random"],
                   help="criteria; CRITERION-rd: our rate-distortion allocation (ours only)")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-threads", type=int, default=2)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", nargs="*", type=int, help="several seeds (calibration, "
                   "training order); overrides --seed")
    p.add_argument("--peers", action="store_true", help="also Torch-Pruning")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = {"command": "python " + " ".join(sys.argv), "commit": commit(),
            "machine": machine_markdown(), "rows": []}
    data["model"] = args.model
    task = task_for(args.model, None)
    fp = load_model(args.model).eval()
    example = task.calibration(2, 0, 2)[0]
    dense = {"tool": "dense", "criterion": "-", "top1": top1(task, fp), "params": params(fp),
             "macs": dense_macs(fp, example)}
    data["rows"].append(dense)
    tools = ["slimtorch"] + (["torch-pruning"] if args.peers else [])
    for seed in args.seeds or [args.seed]:
        args.seed = seed  # run_row reads it
        calib = task.calibration(args.calib_size, seed, 64)
        train = task.training(args.train_size, seed)
        for target in args.targets:
            for crit in args.criteria:
                for tool in (tools if crit in ("magnitude", "taylor", "random")
                             else ["slimtorch"]):
                    try:
                        row = run_row(args, fp, task, calib, train, tool, crit, target)
                    except Exception as e:  # a peer's failure is recorded verbatim
                        row = {"tool": tool, "criterion": crit, "target_macs": target,
                               "seed": seed, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()[-2000:]}
                    data["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}),
                          flush=True)
                    write(data, out)
    write(data, out)


def write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(to_markdown(data))


def to_markdown(data: dict) -> str:
    rows = data["rows"]
    dense = rows[0]
    name = {"zoo:resnet20": "ResNet-20", "zoo:mobilenetv2": "MobileNetV2"}.get(
        data.get("model", "zoo:resnet20"), data.get("model"))
    lines = [f"# Structured pruning: {name} on Fashion-MNIST", "",
             f"Command: `{data['command']}` at commit {data['commit']}.", "",
             data["machine"], "",
             "Accuracy: top-1 on the full 10k test set. MACs: Conv/Linear multiply-accumulates "
             "per image, counted from the captured graph (the same counter for every row). "
             "Recovery: KD from the float model (T = 4, T²·KL, SGD 0.01 momentum 0.9, cosine, "
             "batch 128) on the 60k train split, the same loop for every tool. Latency: "
             "onnxruntime fp32, batch 64, median of 3 interleaved rounds. CRITERION-rd: "
             "per-group amounts by the rate-distortion DP (prune/rd.py); δ: measured output "
             "distortion mean ‖f − f'‖² of the one-shot choice, rd vs the global ranking. "
             "hesso: prunes while it trains (the same KD loop and data; its epochs are the "
             "whole budget, nothing after it), so it has no one-shot score.", "",
             "| tool | criterion | target | seed | MACs (M) | params (k) | one-shot top-1 | "
             "top-1 after KD | epochs | ORT b64 ms pruned / dense | speed-up | MACs "
             "reduction | speed-up / MACs reduction | δ rd / global |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | - | 1.0 | - | {dense['macs'] / 1e6:.2f} | {dense['params'] / 1e3:.1f} | "
             f"{dense['top1']:.2f} | - | - | - | 1.00 | 1.00 | - | - |"]
    for r in rows[1:]:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['criterion']} | {r['target_macs']} | "
                         f"{r.get('seed', 0)} | failed: `{r['error'][:200]}` | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['tool']} | {r['criterion']} | {r['target_macs']} | {r.get('seed', 0)} | "
            f"{r['macs'] / 1e6:.2f} "
            f"({r['macs'] / dense['macs']:.3f}) | {r['params'] / 1e3:.1f} | "
            + ("- | " if r["oneshot_top1"] is None else f"{r['oneshot_top1']:.2f} | ")
            + f"{r['top1']:.2f} | {r['epochs']} | "
            f"{r['latency_ms_b64']:.2f} / {r['dense_ms_b64']:.2f} | {r['speedup']:.2f} | "
            f"{r['macs_reduction']:.2f} | {r['speedup'] / r['macs_reduction']:.2f} | "
            + (f"{r['distortion']:.2f} / {r['global_ranking_distortion']:.2f} |"
               if "distortion" in r else "- |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
