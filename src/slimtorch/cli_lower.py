"""``slimtorch lower DIR --integer-only``: the integer-only (I-ViT) form of an artifact's float
model, calibrated on the artifact's own calibration set, scored beside the float model, the
artifact's fake-quant model and I-ViT's fake-quant twin, and saved into DIR
(``intops.integer_artifact``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .errors import ArtifactError, IntegerOnlyError
from .eval.tasks import run_batches, task_for

console = Console()


def lower_integer_only(directory: str | Path, *, exp: str = "shift", test_size: int | None = None,
                       progress: bool = True) -> dict:
    """Build, score and save the integer-only model of artifact ``directory``; returns the
    metrics (also written to ``DIR/integer_only.json``)."""
    from .api import load
    from .intops.integer_artifact import integer_only, save_integer_only
    from .zoo.sources import load_model
    directory = Path(directory)
    try:
        source = json.loads((directory / "slimtorch.json").read_text())["source"]
        metrics_file = directory / "metrics.json"  # written by the CLI: its calibration set
        run = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{directory}: not a slimtorch artifact ({e}); make one with "
                            "`slimtorch quantize --model SRC --recipe w8a8 --out DIR`") from None
    task = task_for(source)
    if not hasattr(task, "test_images"):
        raise IntegerOnlyError(f"{source}: integer-only lowering takes image models (one Tensor "
                               "input); token inputs need an integer embedding and mask")
    model = load_model(source)
    calib = task.calibration(run.get("calib_size", 1024), run.get("seed", 0), 128)
    t0 = time.perf_counter()
    io = integer_only(model, calib, exp=exp)
    calib_s = time.perf_counter() - t0
    batches = task.inputs(test_size)
    outs = {"float": run_batches(model, batches, progress, "float"),
            "artifact": run_batches(load(directory), batches, progress, "artifact"),
            "I-ViT fake": torch.cat([io.fake(b) for b in batches])}
    t0 = time.perf_counter()
    outs["integer-only"] = run_batches(io, batches, progress, "integer-only")
    int_s = time.perf_counter() - t0
    metrics = {"exp": exp, "calib_size": run.get("calib_size"), "calib_seconds": round(calib_s, 2),
               "integer_seconds": round(int_s, 2), "test_images": sum(len(b) for b in batches)}
    labels = _labels(task, metrics["test_images"])
    for name, out in outs.items():
        metrics[name] = ({} if labels is None else
                         {"top1": round(100 * (out.argmax(1) == labels).float().mean().item(), 2)})
        for ref in REFS:
            if ref != name:
                agree = (out.argmax(1) == outs[ref].argmax(1)).float().mean().item()
                metrics[name][f"agree {ref} %"] = round(100 * agree, 2)
    save_integer_only(io, directory, source=source, extra={"metrics": metrics})
    return metrics


REFS = ("float", "artifact", "I-ViT fake")  # artifact: its fake-quant model


def _labels(task, n: int):
    """The first ``n`` test labels of a classification task (None for fidelity-only tasks)."""
    if getattr(task, "kind", None) != "classification":
        return None
    from .data.fashion_mnist import test_set
    return test_set(task.data_dir)[1][:n]


def table(metrics: dict) -> Table:
    t = Table(title=f"integer-only (I-ViT, exp={metrics['exp']}) · {metrics['test_images']} "
              "test images")
    cols = [*REFS, "integer-only"]
    t.add_column("")
    for c in cols:
        t.add_column(c, justify="right")
    rows = ["top1"] + [f"agree {r} %" for r in REFS]
    for r in rows:
        t.add_row("top-1 %" if r == "top1" else r,
                  *[str(metrics[c].get(r, "")) for c in cols])
    return t


def cmd_lower(args) -> None:
    if not args.integer_only:
        raise IntegerOnlyError("`slimtorch lower` needs --integer-only (int8 kernels for a "
                               "quantized model run in `slimtorch bench speed` and `generate`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = lower_integer_only(args.dir, exp=args.exp, test_size=args.test_size,
                                 progress=not args.quiet)
    console.print(table(metrics))
    console.print(f"integer-only files written to {args.dir} "
                  f"(integer forward {metrics['integer_seconds']} s)")


def register(subparsers) -> None:
    lo = subparsers.add_parser("lower", help="integer-only (I-ViT) form of an artifact's model: "
                               "integer kernels from input to output, scored and saved")
    lo.add_argument("dir", help="artifact directory (from `slimtorch quantize`)")
    lo.add_argument("--integer-only", action="store_true", help="Shiftmax, ShiftGELU, "
                    "I-LayerNorm, int8 matmuls and dyadic requantisation")
    lo.add_argument("--exp", choices=("shift", "poly"), default="shift",
                    help="integer exponential: I-ViT's shifts or I-BERT's polynomial")
    lo.add_argument("--test-size", type=int, help="first N test images (default: all)")
    lo.add_argument("--threads", type=int)
    lo.add_argument("--quiet", action="store_true")
    lo.set_defaults(fn=cmd_lower)
