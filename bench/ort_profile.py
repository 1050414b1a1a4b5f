"""Where the time goes in onnxruntime: per-op-type and per-layer kernel times, fp32 vs int8.

For each model: quantize W8A8 (``w8a8`` recipe, seeded train/calib subset), export the float
model and the quantized model to ONNX, and profile both with onnxruntime's own profiler
(``op_profile``: median kernel time per node over repeated runs) at one batch size. Prints
markdown and writes bench/results/ort_profile.md. Kernel times are per-node medians, so they
are less sensitive to other load on the machine than wall-clock latency, but not immune.

    python bench/ort_profile.py [--models resnet20 minilm] [--batch 64] [--threads 1]
                                [--weight-form auto|s8|u8]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from slimtorch import load
from slimtorch.cli_deploy import deploy_inputs
from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_text_atomic
from slimtorch.export.onnx import _signature, export_onnx
from slimtorch.export.onnx_check import op_profile
from slimtorch.export.onnx_weight_form import WEIGHT_FORMS
from slimtorch.pipeline import run_quantize
from slimtorch.zoo.sources import load_model
from speed import source_of  # bench/ is the script's directory

COMPUTE = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "QLinearConv", "QLinearMatMul",
           "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger"}


def profile_model(name: str, args, tmp: Path) -> dict:
    source = source_of(name)
    run_quantize(source, "w8a8", calib_size=args.calib_size, seed=0, out=tmp / name)
    example = deploy_inputs(source, 2)
    export_onnx(load_model(source), tmp / f"{name}_fp32.onnx", example, opset=17, threads=1)
    export_onnx(load(tmp / name), tmp / f"{name}_int8.onnx", example, threads=1,
                weight_form=args.weight_form)
    names, tensors, _ = _signature(deploy_inputs(source, args.batch))
    feeds = {n: t.numpy() for n, t in zip(names, tensors)}
    return {eng: op_profile(tmp / f"{name}_{eng}.onnx", feeds, threads=args.threads,
                            runs=args.runs) for eng in ("fp32", "int8")}


def to_markdown(name: str, prof: dict, args) -> list[str]:
    fp, q = prof["fp32"], prof["int8"]
    lines = [f"### {name} (batch {args.batch}, {args.threads} thread(s)): kernel time per run "
             f"fp32 {fp['total_ms']:.2f} ms, int8 {q['total_ms']:.2f} ms "
             f"({fp['total_ms'] / q['total_ms']:.2f}×)", "",
             "| op (fp32 graph) | ms | op (int8 graph) | ms |", "|---|---:|---|---:|"]
    a, b = list(fp["ops"].items())[:8], list(q["ops"].items())[:8]
    for i in range(max(len(a), len(b))):
        left = f"{a[i][0]} | {a[i][1]:.2f}" if i < len(a) else " | "
        right = f"{b[i][0]} | {b[i][1]:.2f}" if i < len(b) else " | "
        lines.append(f"| {left} | {right} |")
    cf = [n for n in fp["nodes"] if n["op"] in COMPUTE]
    cq = [n for n in q["nodes"] if n["op"] in COMPUTE]
    if len(cf) == len(cq) and len(cf) <= 40:  # layer by layer, in execution order
        lines += ["", "| # | fp32 kernel | ms | int8 kernel | ms | speed-up |",
                  "|---:|---|---:|---|---:|---:|"]
        for i, (f, g) in enumerate(zip(cf, cq)):
            lines.append(f"| {i} | {f['op']} | {f['ms']:.3f} | {g['op']} | {g['ms']:.3f} | "
                         f"{f['ms'] / max(g['ms'], 1e-9):.2f}× |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "minilm"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--weight-form", choices=WEIGHT_FORMS, default="auto",
                   help="int8 file's weight codes (export_onnx)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_profile"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            lines += to_markdown(name, profile_model(name, args, Path(tmp)), args)
            print(f"{name}: profiled", flush=True)
    head = (machine_markdown() + f"; W8A8 (`w8a8` recipe), calibration {args.calib_size}; "
            f"int8 weight codes `--weight-form {args.weight_form}`; "
            f"load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}.")
    md = "\n".join([head, ""] + lines)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), md + "\n")


if __name__ == "__main__":
    main()
