"""Deployment table: W8A8 zoo models and MiniLM in fp32/int8, PyTorch/onnxruntime.

For each model: quantize W8A8 (``pipeline.run_quantize``, calibration on a seeded train subset),
export to ONNX QDQ and check onnxruntime against the PyTorch quantized model on the test set
(top-1 agreement on the 10 000 Fashion-MNIST test images; cosine and retrieval top-1 agreement
of embeddings on 1000 eval sentences for MiniLM), then time fp32 PyTorch, fp32 onnxruntime,
int8 onnxruntime and int8 PyTorch (``lower_to_int8``) at batch 1 and 64 with 2 threads (median
of repeated runs after warm-up), and measure sizes on disk. Prints markdown and writes
bench/results/speed.md (+ .json). ``--weight-form`` picks the int8 file's weight codes
(``export_onnx``: s8, or u8 = uint8 + 128, exact on x86 CPUs without VNNI; auto by CPU).
``--runtime onnxruntime,openvino`` times (and checks) the same files in each runtime.

    python bench/speed.py [--models resnet20 mobilenetv2 vit minilm] [--calib-size 1024]
                          [--batches 1 64] [--weight-form auto|s8|u8]
                          [--runtime onnxruntime,openvino] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from slimtorch import load
from slimtorch.cli_deploy import BATCHES, check_items, deploy_inputs, measure_speed, speedups
from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_text_atomic
from slimtorch.export.onnx import export_onnx
from slimtorch.export.onnx_weight_form import WEIGHT_FORMS
from slimtorch.pipeline import run_quantize
from slimtorch.zoo.registry import weights_path

MODELS = ["resnet20", "mobilenetv2", "vit", "minilm"]


def engines(runtimes) -> list[str]:
    """Engine columns in the order ``measure_speed`` times them."""
    return ["fp32 PyTorch", *(f"{p} {rt}" for rt in runtimes for p in ("fp32", "int8")),
            "int8 PyTorch"]


def source_of(name: str) -> str:
    return "minilm" if name == "minilm" else f"zoo:{name}"


def run_model(name: str, args, workdir: Path) -> dict | None:
    source = source_of(name)
    if source.startswith("zoo:") and not weights_path(name).is_file():
        print(f"{name}: zoo weights not trained, skipped", flush=True)
        return None
    art = workdir / name
    metrics, _ = run_quantize(source, "w8a8", calib_size=args.calib_size, seed=args.seed,
                              out=art)
    n = 10000 if source.startswith("zoo:") else 1000
    items = check_items(source, n)
    report = export_onnx(load(art), workdir / f"{name}.onnx", deploy_inputs(source, 8),
                         check_inputs=items, threads=args.threads, weight_form=args.weight_form,
                         runtimes=args.runtime)
    ort_quality = ort_task_score(source, workdir / f"{name}.onnx", items, args.threads)
    float64 = float64_agreement(load(art), items)
    speed = measure_speed(art, batches=tuple(args.batches), threads=args.threads,
                          repeats=args.repeats, weight_form=args.weight_form,
                          runtimes=args.runtime)
    print(f"{name}: exported, agreement {report.agreement}, speed {speed['rows']}", flush=True)
    return {"model": name, "metrics": metrics, "export": report.to_dict(), "speed": speed,
            "ort_quality": ort_quality, "float64": float64}


def float64_agreement(qmodel, items: list) -> dict:
    """The same quantized PyTorch model evaluated in float64 vs float32, compared like
    onnxruntime vs PyTorch: the agreement that float rounding alone allows."""
    from slimtorch.export.onnx import reference_output
    from slimtorch.export.onnx_check import compare, concat_padded
    ref = concat_padded([reference_output(qmodel, it) for it in items])
    q64 = qmodel.double()
    got = concat_padded([reference_output(q64, _to_double(it)) for it in items])
    masks = [it["attention_mask"].numpy() for it in items if isinstance(it, dict)]
    return compare(ref, got, concat_padded(masks) if masks else None)


def _to_double(item):
    if isinstance(item, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in item.items()}
    return item.double()


def ort_task_score(source: str, path: Path, items: list, threads: int) -> dict:
    """The task's score (vs labels and vs the float model) of the int8 ONNX model run by
    onnxruntime, on the same samples the PyTorch scores in metrics.json use."""
    from slimtorch.eval.tasks import task_for
    from slimtorch.export.onnx import _signature
    from slimtorch.export.onnx_check import make_session
    from slimtorch.zoo.minilm import mean_pool
    from slimtorch.zoo.sources import load_model
    task, sess = task_for(source), make_session(path, threads)
    outs = []
    for it in items:
        names, tensors, _ = _signature(it)
        out = torch.from_numpy(sess.run(None, {k: t.numpy() for k, t in zip(names, tensors)})[0])
        if isinstance(it, dict):  # token states -> L2-normalised mean-pooled embedding
            out = torch.nn.functional.normalize(mean_pool(out, it["attention_mask"]), dim=-1)
        outs.append(out)
    return task.score(torch.cat(outs), task.outputs(load_model(source)))


def to_markdown(results: list[dict], args, load_before: tuple, load_after: tuple) -> str:
    runtimes = results[0]["speed"]["runtimes"] if results else ["onnxruntime"]
    cols = engines(runtimes)
    lines = [machine_markdown() + f"; W8A8 (`w8a8` recipe), calibration {args.calib_size} "
             f"samples, seed {args.seed}; {args.threads} threads; int8 ONNX weight codes "
             f"{_forms(results)} (`--weight-form {args.weight_form}`); load average before/after: "
             f"{load_before[0]:.2f} / {load_after[0]:.2f}.", "",
             "Latency (median ms per batch):", "",
             "| model | batch | " + " | ".join(cols) + " | " + " | ".join(
                 f"int8 vs fp32 {rt}" for rt in runtimes) + " | int8 PyTorch vs fp32 PyTorch |",
             "|---|---:|" + "---:|" * (len(cols) + len(runtimes) + 1)]
    for r in results:
        sp = speedups(r["speed"])
        for b in sorted(sp):
            ms = {x["engine"]: x["ms"] for x in r["speed"]["rows"] if x["batch"] == b}
            lines.append(f"| {r['model']} | {b} | " + " | ".join(f"{ms[e]:.2f}" for e in cols)
                         + "".join(f" | {sp[b][f'int8_vs_fp32 {rt}']:.2f}×" for rt in runtimes)
                         + f" | {sp[b]['int8_torch_vs_fp32_torch']:.2f}× |")
    lines += ["", "Size on disk:", "", "| model | fp32 weights | slimtorch artifact | ratio | "
              "fp32 ONNX | int8 ONNX | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["speed"]["sizes"]
        lines.append(f"| {r['model']} | {s['fp32_state_bytes'] / 1e6:.3f} MB | "
                     f"{s['artifact_bytes'] / 1e6:.3f} MB | "
                     f"{s['fp32_state_bytes'] / s['artifact_bytes']:.2f}× | "
                     f"{s['fp32_onnx_bytes'] / 1e6:.3f} MB | {s['int8_onnx_bytes'] / 1e6:.3f} MB"
                     f" | {s['fp32_onnx_bytes'] / s['int8_onnx_bytes']:.2f}× |")
    lines += ["", "Quality on the task (PyTorch W8A8 from metrics.json; ORT W8A8 = the exported file "
              "run by onnxruntime on the same samples):", "",
              "| model | metric | float | PyTorch W8A8 | ORT W8A8 |", "|---|---|---:|---:|---:|"]
    for r in results:
        m, o = r["metrics"], r["ort_quality"]
        for key in ("top1", "top1_agreement", "cosine", "retrieval_agreement"):
            if key in o:
                lines.append(f"| {r['model']} | {key} | {m.get('fp_' + key, '')} | "
                             f"{m['q_' + key]} | {o[key]} |")
    lines += ["", "onnxruntime vs PyTorch quantized (same inputs), kernels in ORT's optimised "
              "graph; last column: the same PyTorch quantized model in float64 vs float32 "
              "(what float rounding alone changes):", "",
              "| model | samples | ORT vs PyTorch | max abs diff | int8 kernels | "
              "float compute left | quantized ops in float | PyTorch fp64 vs fp32 |",
              "|---|---:|---:|---:|---|---|---|---:|"]
    for r in results:
        e, a = r["export"], r["export"]["agreement"]
        lines.append(f"| {r['model']} | {a['n']} | {_agree(a)} | {a['max_abs_diff']:.3g} | "
                     f"{_counts(e['int8_kernels'])} | {_counts(e['float_compute']) or '-'} | "
                     f"{_counts(e.get('float_quantized', {})) or '-'} | "
                     f"{_agree(r['float64'])} |")
    others = [(r["model"], rt, c) for r in results
              for rt, c in r["export"]["runtime_checks"].items()]
    if others:
        lines += ["", "Other runtimes vs PyTorch quantized (same file, same inputs); layers "
                  "whose data input is int8 in the compiled model:", "",
                  "| model | runtime | agreement | max abs diff | int8 / float layers |",
                  "|---|---|---:|---:|---:|"]
        for model, rt, c in others:
            lines.append(f"| {model} | {rt} | " + (
                f"{_agree(c['agreement'])} | {c['agreement']['max_abs_diff']:.3g} | "
                f"{c['census']['int8_layers']} / {c['census']['float_layers']} |"
                if "error" not in c else f"error: {c['error']} | | |"))
    return "\n".join(lines)


def _forms(results: list[dict]) -> str:
    return "/".join(dict.fromkeys(r["export"]["weight_form"] for r in results)) or "-"


def _agree(a: dict) -> str:
    return (f"top-1 {a['top1_agreement']:.2f} %" if "top1_agreement" in a else
            f"retrieval top-1 {a['retrieval_agreement']:.2f} %, cosine {a['cosine_mean']:.5f}")


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--weight-form", choices=WEIGHT_FORMS, default="auto")
    p.add_argument("--runtime", default="onnxruntime",
                   help="comma-separated: onnxruntime, openvino")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = [r for name in args.models if (r := run_model(name, args, Path(tmp)))]
    md = to_markdown(results, args, load_before, os.getloadavg())
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), md + "\n")
    write_text_atomic(Path(args.out + ".json"), json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
