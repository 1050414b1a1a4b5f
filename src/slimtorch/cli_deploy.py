"""Deployment commands: ``slimtorch export DIR --onnx FILE`` and ``slimtorch bench speed DIR``.

``register(subparsers)`` adds them to the parser of ``cli.py``. ``deploy_inputs`` and
``measure_speed`` are shared with ``bench/speed.py``.

Speed protocol (DESIGN.md): fp32 PyTorch, fp32 and int8 in each runtime (``--runtime
onnxruntime,openvino``; ``export.runtime``) on the same two ONNX files, int8 PyTorch
(``intops.lower_to_int8``), at batch 1 and 64, 2 threads, median of repeated runs after warm-up
(the engines take turns over three rounds: ``interleaved_ms``), on real inputs of the
artifact's task (Fashion-MNIST test images, Austen sentences). On an LLM artifact ``bench speed``
measures prefill and decode tokens/s of fp32 against ``slimtorch.lower``'s form instead
(``eval.decode_speed``). Either result is kept in ``DIR/speed.json``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from .errors import SlimtorchError
from .eval.machine import torch_threads

console = Console()
BATCHES = (1, 64)


# ---------------------------------------------------------------- inputs of an artifact's task
def deploy_inputs(source: str, batch: int, *, offset: int = 0, data_dir: str | None = None
                  ) -> Any:
    """One input item of ``batch`` samples for the task of ``source``: a Tensor of test images
    (zoo models: Fashion-MNIST test images, evaluation photo crops) or a dict of token tensors
    of eval-pool sentences (MiniLM)."""
    from .eval.tasks import TextEmbedding, task_for
    task = task_for(source, data_dir)
    if isinstance(task, TextEmbedding):
        from .data.text import load_sentences, text_batches
        from .zoo.minilm import load_tokenizer
        sentences = load_sentences("eval")[offset: offset + batch]
        return text_batches(load_tokenizer(), sentences, batch)[0]
    return task.test_images()[offset: offset + batch]


def check_items(source: str, n: int, data_dir: str | None = None) -> list:
    """``n`` test samples of the task of ``source``, batched as its evaluation batches them
    (``inputs``): images, or eval sentences followed by their near-duplicates, so the top-1
    retrieval prediction of every row has a right answer."""
    from .eval.tasks import task_for
    return task_for(source, data_dir).inputs(n)


# ---------------------------------------------------------------- timing
def median_ms(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 15,
              min_seconds: float = 1.0, max_repeats: int = 200) -> float:
    """Median wall time (ms) of ``fn`` over ≥ ``repeats`` runs (and ≥ ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds
                                   and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(runners: dict[str, Callable[[], Any]], *, rounds: int = 3,
                   repeats: int = 15) -> dict[str, float]:
    """Median over ``rounds`` rounds of each runner's median time (ms), the runners taking
    turns round by round, so a burst of other load on the machine hits one round of every
    engine rather than all runs of one engine."""
    per_round = max(3, -(-repeats // rounds))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):
        for name, fn in runners.items():
            times[name].append(median_ms(fn, warmup=3 if r == 0 else 1, repeats=per_round,
                                         min_seconds=0.3))
    return {k: statistics.median(v) for k, v in times.items()}


def _torch_runner(model, item) -> Callable[[], Any]:
    from .graph.capture import call_model

    def run():
        with torch.inference_mode():
            return call_model(model, item)
    return run


def _onnx_runner(runtime, path: Path, item, threads: int) -> Callable[[], Any]:
    from .export.onnx import _signature
    run = runtime.session(path, threads)
    names, tensors, _ = _signature(item)
    feeds = {n: t.numpy() for n, t in zip(names, tensors)}
    return lambda: run(feeds)


def measure_speed(directory: str | Path, *, batches=BATCHES, threads: int = 2,
                  repeats: int = 15, data_dir: str | None = None,
                  weight_form: str = "auto",
                  runtimes: str | tuple[str, ...] = ("onnxruntime",)) -> dict[str, Any]:
    """Latency of fp32/int8 PyTorch and of fp32/int8 in each of ``runtimes`` (the same fp32
    and int8 ONNX files for every runtime) for the artifact in ``directory``, sizes on disk,
    and each runtime's int8 census; ``weight_form``: of the int8 ONNX file (``export_onnx``)."""
    from .export.artifact import read_config
    from .export.runtime import parse_runtimes
    runtimes = parse_runtimes(runtimes)  # a missing runtime fails before any work
    source = read_config(directory).get("source")
    if not source:
        raise SlimtorchError("this artifact was made from a custom model; benchmark it from "
                             "Python")
    with torch_threads(threads):
        return _measure(source, directory, batches, threads, repeats, data_dir, weight_form,
                        runtimes)


def _measure(source, directory, batches, threads, repeats, data_dir, weight_form, runtimes
             ) -> dict[str, Any]:
    from . import load
    from .eval.size import fp_size_bytes
    from .export.artifact import TENSORS
    from .export.onnx import export_onnx
    from .export.runtime import get_runtime
    from .intops import lower_to_int8, lowering_summary
    from .zoo.sources import load_model
    fp, q, q_int = load_model(source), load(directory), lower_to_int8(load(directory))
    example = deploy_inputs(source, 2, data_dir=data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fp_onnx, q_onnx = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(fp, fp_onnx, example, opset=17, threads=threads)
        report = export_onnx(q, q_onnx, example, threads=threads, weight_form=weight_form,
                             runtimes=runtimes)
        rows = []
        for b in batches:
            item = deploy_inputs(source, b, data_dir=data_dir)
            runners = {"fp32 PyTorch": _torch_runner(fp, item)}
            for name in runtimes:
                rt = get_runtime(name)
                runners[f"fp32 {name}"] = _onnx_runner(rt, fp_onnx, item, threads)
                runners[f"int8 {name}"] = _onnx_runner(rt, q_onnx, item, threads)
            runners["int8 PyTorch"] = _torch_runner(q_int, item)
            for engine, ms in interleaved_ms(runners, repeats=repeats).items():
                rows.append({"engine": engine, "batch": b, "ms": round(ms, 3)})
        sizes = {"fp32_state_bytes": fp_size_bytes(fp),
                 "artifact_bytes": (Path(directory) / TENSORS).stat().st_size,
                 "fp32_onnx_bytes": fp_onnx.stat().st_size,
                 "int8_onnx_bytes": q_onnx.stat().st_size}
    return {"model": source, "threads": threads, "rows": rows, "sizes": sizes,
            "runtimes": list(runtimes), "int8_kernels": report.int8_kernels,
            "float_compute": report.float_compute, "float_quantized": report.float_quantized,
            "runtime_checks": report.runtime_checks, "weight_form": report.weight_form,
            "torch_int8_layers": len(lowering_summary(q_int)["int8"])}


def speedups(result: dict) -> dict[int, dict[str, float]]:
    """Per batch: int8 vs fp32 in each runtime (``int8_vs_fp32 <runtime>``) and in PyTorch."""
    out: dict[int, dict[str, float]] = {}
    for b in sorted({r["batch"] for r in result["rows"]}):
        ms = {r["engine"]: r["ms"] for r in result["rows"] if r["batch"] == b}
        sp = {f"int8_vs_fp32 {rt}": ms[f"fp32 {rt}"] / ms[f"int8 {rt}"]
              for rt in result.get("runtimes", ["onnxruntime"])}
        sp["int8_torch_vs_fp32_torch"] = ms["fp32 PyTorch"] / ms["int8 PyTorch"]
        out[b] = sp
    return out


# ---------------------------------------------------------------- commands
def cmd_export(args) -> None:
    from . import load
    from .export.artifact import read_config, versions, write_json_atomic
    from .export.onnx import export_onnx
    directory = Path(args.dir)
    source = read_config(directory).get("source")
    if not source:
        raise SlimtorchError("this artifact was made from a custom model; export it from "
                             "Python with slimtorch.export.onnx.export_onnx")
    qmodel = load(directory)
    example = deploy_inputs(source, 8, data_dir=args.data_dir)
    n = args.check_samples or (10000 if source.startswith("zoo:") else 1000)
    report = export_onnx(qmodel, args.onnx, example, opset=args.opset,
                         check_inputs=check_items(source, n, args.data_dir),
                         conv_integer=args.conv_integer, portable=args.portable,
                         int4=args.int4, weight_form=args.weight_form, threads=args.threads,
                         runtimes=args.runtime)
    console.print(export_table(report, f"{directory} → {args.onnx}"))
    write_json_atomic(directory / "export_report.json",
                      {"source": source, "versions": versions(), **report.to_dict()})
    console.print(f"report written to [bold]{directory / 'export_report.json'}[/bold]")


def export_table(report, title: str) -> Table:
    t = Table(title=title)
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("ONNX file", f"{report.file_bytes / 1e6:.3f} MB, opset {report.opset}")
    t.add_row("QDQ in the file", f"{report.activation_qdq} activation Q/DQ, "
              f"{report.weight_dq} integer weights ({report.int4_weights} as INT4)")
    t.add_row("weight codes", f"{report.weight_form} ({report.weight_form_reason}; "
              f"{report.rewrites.get('u8_weights', 0)} stored as uint8 + 128)")
    if report.ort_error:
        t.add_row("[red]onnxruntime[/red]", report.ort_error)
    else:
        _agreement_rows(t, "ORT", report.agreement)
        t.add_row("int8 kernels (ORT optimised graph)",
                  _counts(report.int8_kernels) or "[red]none")
        t.add_row("float compute left", _counts(report.float_compute) or "none")
        for f in report.quantized_fallbacks:
            t.add_row(f"[yellow]quantized {f['op']} run in float[/yellow]",
                      f"{_short(f['node'])}: {f['reason']}")
    for rt, check in report.runtime_checks.items():
        if "error" in check:
            t.add_row(f"[red]{rt}[/red]", check["error"])
            continue
        c = check["census"]
        _agreement_rows(t, rt, check["agreement"])
        t.add_row(f"{rt} layers int8 / float", f"{c['int8_layers']} / {c['float_layers']} ("
                  + ", ".join(f"{k}: {_counts(v)}" for k, v in c["layers"].items()) + ")")
        if c["float"]:
            t.add_row(f"[yellow]{rt} float layers[/yellow]", ", ".join(
                f"{_short(f['layer'])} ({f['primitive']})" for f in c["float"]))
    if report.float_quantizers or report.float_weights:
        t.add_row("[yellow]exported as float arithmetic[/yellow]",
                  ", ".join(report.float_quantizers + report.float_weights))
    return t


def _agreement_rows(t: Table, runtime: str, a: dict) -> None:
    t.add_row(f"{runtime} checked on", f"{a['n']} samples")
    t.add_row(f"max |{runtime} − PyTorch|",
              f"{a['max_abs_diff']:.3g} ({a['max_rel_diff']:.2%} of max)")
    for key, label in (("top1_agreement", "top-1 agreement %"), ("cosine_mean", "mean cosine"),
                       ("retrieval_agreement", "retrieval top-1 agreement %")):
        if key in a:
            t.add_row(f"{runtime} {label}", f"{a[key]:.5g}")


def _short(node: str) -> str:
    """``/model/layers/layers.0/conv2/Conv`` -> ``layers.0/conv2``."""
    parts = [p for p in node.split("/") if p][1:-1]  # drop the wrapper and the op name
    return "/".join(p for i, p in enumerate(parts)
                    if not any(q.startswith(p + ".") for q in parts[i + 1:])) or node


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items())


def cmd_bench_speed(args) -> None:
    from .eval.machine import machine_markdown
    if _is_causal_lm(args.dir):
        from .eval.decode_speed import measure_decode
        result = measure_decode(args.dir, threads=args.threads, prompt_tokens=args.prompt_tokens,
                                new_tokens=args.new_tokens, rounds=3,
                                repeats=max(1, args.repeats // 5))
        console.print(decode_table(result))
        console.print(machine_markdown(), highlight=False)
        _write_speed(args.dir, "decode", result)
        return
    result = measure_speed(args.dir, batches=tuple(args.batches), threads=args.threads,
                           repeats=args.repeats, data_dir=args.data_dir,
                           weight_form=args.weight_form, runtimes=args.runtime)
    console.print(speed_table(result))
    console.print(machine_markdown(), highlight=False)
    _write_speed(args.dir, "latency", result)


SPEED_FILE = "speed.json"


def _write_speed(directory, kind: str, result: dict) -> None:
    """Keep the measurement beside the artifact (``DIR/speed.json``, written atomically):
    ``kind`` "latency" (``measure_speed``) or "decode" (``measure_decode``), the machine it
    ran on; ``slimtorch report`` reads it."""
    from .eval.machine import machine_info
    from .export.artifact import write_json_atomic
    path = Path(directory) / SPEED_FILE
    write_json_atomic(path, {"kind": kind, "machine": machine_info(), **result})
    console.print(f"speed written to [bold]{path}[/bold]")


def _is_causal_lm(directory) -> bool:
    """Whether the artifact holds a zoo language model (decode speed instead of latency)."""
    from .export.artifact import read_config
    from .pipeline import causal_lm_entry
    return causal_lm_entry(read_config(directory).get("source")) is not None


def decode_table(result: dict) -> Table:
    sp, wb = result["speed"], result["linear_weight_bytes"]
    t = Table(title=f"{result['model']}: batch 1, {result['threads']} threads, prefill of "
              f"{result['prompt_tokens']} tokens, greedy decode of {result['new_tokens']}")
    for col in ("engine", "prefill tok/s", "decode tok/s", "Linear weights MB"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for name in ("fp32", "lowered"):
        t.add_row(name, f"{sp[name]['prefill_tok_s']:.0f}", f"{sp[name]['decode_tok_s']:.1f}",
                  f"{wb[name] / 1e6:.1f}")
    t.add_row("lowered vs fp32", f"{sp['lowered']['prefill_tok_s'] / sp['fp32']['prefill_tok_s']:.2f}×",
              f"{sp['lowered']['decode_tok_s'] / sp['fp32']['decode_tok_s']:.2f}×", "")
    low = result["lowered"]
    t.add_row("lowered layers", f"{low['packed']} packed low-bit, {low['int8']} int8, "
              f"{low['fake_quant']} fake quant", "", "")
    return t


def speed_table(result: dict) -> Table:
    t = Table(title=f"{result['model']}: median latency (ms), {result['threads']} threads, "
              f"int8 weight codes {result['weight_form']}")
    batches = sorted({r["batch"] for r in result["rows"]})
    t.add_column("engine")
    for b in batches:
        t.add_column(f"batch {b}", justify="right")
    for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
        ms = {r["batch"]: r["ms"] for r in result["rows"] if r["engine"] == engine}
        t.add_row(engine, *(f"{ms[b]:.2f}" for b in batches))
    sp = speedups(result)
    for rt in result["runtimes"]:
        t.add_row(f"int8 vs fp32 {rt}", *(f"{sp[b][f'int8_vs_fp32 {rt}']:.2f}×" for b in batches))
    if "onnxruntime" in result["runtimes"]:
        t.add_row("onnxruntime quantized ops in float", _counts(result["float_quantized"])
                  or "none", *([""] * (len(batches) - 1)))
    for rt, check in result["runtime_checks"].items():
        c = check.get("census")
        t.add_row(f"{rt} layers int8 / float", f"{c['int8_layers']} / {c['float_layers']}"
                  if c else f"[red]{check['error']}", *([""] * (len(batches) - 1)))
    s = result["sizes"]
    t.add_row("size: fp32 → artifact", f"{s['fp32_state_bytes'] / 1e6:.3f} MB → "
              f"{s['artifact_bytes'] / 1e6:.3f} MB "
              f"({s['fp32_state_bytes'] / s['artifact_bytes']:.2f}× smaller)",
              *([""] * (len(batches) - 1)))
    t.add_row("size: fp32 ONNX → int8 ONNX", f"{s['fp32_onnx_bytes'] / 1e6:.3f} MB → "
              f"{s['int8_onnx_bytes'] / 1e6:.3f} MB "
              f"({s['fp32_onnx_bytes'] / s['int8_onnx_bytes']:.2f}× smaller)",
              *([""] * (len(batches) - 1)))
    return t


def register(subparsers) -> None:
    """Add ``export`` and ``bench speed`` to the subparsers of ``cli.build_parser``."""
    ex = subparsers.add_parser("export", help="export an artifact to ONNX (QDQ) and check it "
                               "with onnxruntime")
    ex.add_argument("dir", help="artifact directory")
    ex.add_argument("--onnx", required=True, help="output .onnx file")
    ex.add_argument("--opset", type=int, default=21)
    ex.add_argument("--check-samples", type=int,
                    help="test samples to compare on (default: 10000 images / 1000 sentences)")
    ex.add_argument("--conv-integer", action="store_true",
                    help="run convs whose output is not re-quantized as ConvInteger")
    ex.add_argument("--portable", action="store_true",
                    help="standard ONNX operators only (default: Linear biases fused into "
                    "onnxruntime's MatMulIntegerToFloat, which only onnxruntime runs)")
    ex.add_argument("--int4", action="store_true",
                    help="store 4-bit weights as INT4 (opset ≥ 21): a smaller file, but those "
                    "layers run in float (no 4-bit kernels); default int8 codes, int8 kernels")
    _weight_form_arg(ex)
    _runtime_arg(ex, "check the file in")
    ex.add_argument("--threads", type=int, default=2)
    ex.add_argument("--data-dir", help="Fashion-MNIST IDX directory")
    ex.set_defaults(fn=cmd_export)
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_cmd", required=True)
    sp = bench.add_parser("speed", help="latency of fp32/int8 in PyTorch and onnxruntime")
    sp.add_argument("dir", help="artifact directory")
    sp.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--repeats", type=int, default=15)
    sp.add_argument("--prompt-tokens", type=int, default=128, help="LLM artifacts: prompt "
                    "length for prefill and decode")
    sp.add_argument("--new-tokens", type=int, default=128, help="LLM artifacts: tokens to "
                    "decode")
    sp.add_argument("--data-dir")
    _weight_form_arg(sp)
    _runtime_arg(sp, "time fp32 and int8 in")
    sp.set_defaults(fn=cmd_bench_speed)


def _runtime_arg(parser, what: str) -> None:
    from .export.runtime import RUNTIMES
    parser.add_argument("--runtime", default="onnxruntime",
                        help=f"comma-separated runtimes to {what}: {', '.join(RUNTIMES)} "
                        "(default: onnxruntime; openvino needs pip install 'slimtorch[deploy]')")


def _weight_form_arg(parser) -> None:
    from .export.onnx_weight_form import WEIGHT_FORMS
    parser.add_argument("--weight-form", choices=WEIGHT_FORMS, default="auto",
                        help="int8 weight codes as int8 (s8) or as uint8 + 128 (u8), which "
                        "onnxruntime computes exactly on x86 CPUs without VNNI; auto: u8 on "
                        "such a CPU (default)")
