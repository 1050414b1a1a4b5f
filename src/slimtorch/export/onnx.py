"""ONNX export of a quantized model (QuantizeLinear/DequantizeLinear), checked by onnxruntime.

``export_onnx(qmodel, path, example_inputs)``:

1. traces the model with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``;
   it runs the real forward, so the TorchFunctionMode-based functional-site quantizers of
   attention matmuls take part) inside ``qdq_export_mode``: activation quantizers export as
   Q → DQ, frozen weights as integer constants → DQ (see ``onnx_qdq``); batch (and, for token
   ids, sequence) axes are dynamic;
2. rewrites the graph so onnxruntime finds its integer kernels and pays no avoidable
   quantization overhead, stores asymmetric low-bit weight codes centred in int8 (zero point
   0, same values), packs 4-bit weight codes as INT4 when asked (``int4``, opset ≥ 21), and stores
   8-bit weight codes in the form onnxruntime's int8 kernels compute exactly on the target CPU
   (``weight_form``; see ``onnx_rewrite``, ``onnx_speed`` and ``onnx_weight_form``);
3. checks the file with onnxruntime (CPUExecutionProvider, 2 threads): output vs the PyTorch
   quantized model on the same inputs, and the op types of onnxruntime's optimised graph
   (``onnx_check``); with ``runtimes=("onnxruntime", "openvino")`` the same comparison and an
   int8 census in OpenVINO too (``export.runtime``). A failing check is reported, not raised.

The file is written to a temporary file beside ``path`` and moved into place with
``os.replace`` only when export and rewrite have succeeded: an existing file at ``path`` is
never left half-written.
"""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SlimtorchError
from .artifact import atomic_path
from .onnx_qdq import qdq_export_mode
from .onnx_rewrite import rewrite
from .onnx_weight_form import WEIGHT_FORMS, resolve_weight_form
from .runtime import DEFAULT_RUNTIMES, get_runtime, parse_runtimes

DEFAULT_OPSET = 21
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's newest opset; 21 only adds types/attrs


class OnnxExportError(SlimtorchError):
    """The model could not be exported to ONNX."""


@dataclass
class ExportReport:
    """What was exported and how onnxruntime runs it."""

    path: str
    opset: int
    file_bytes: int
    inputs: list[str]
    activation_qdq: int = 0
    weight_dq: int = 0
    int4_weights: int = 0
    conv_integer: list[str] = field(default_factory=list)
    float_quantizers: list[str] = field(default_factory=list)
    float_weights: list[str] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)
    weight_form: str = "s8"  # int8 codes as they are, or "u8": uint8 + 128 (onnx_weight_form)
    weight_form_reason: str = ""
    ort_error: str | None = None
    agreement: dict[str, Any] = field(default_factory=dict)
    int8_kernels: dict[str, int] = field(default_factory=dict)
    float_compute: dict[str, int] = field(default_factory=dict)
    quant_ops: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)
    ort_ops: dict[str, int] = field(default_factory=dict)
    # other runtimes checked (``runtimes=``), by name: {"agreement", "census"} or {"error"}
    runtime_checks: dict[str, dict] = field(default_factory=dict)

    @property
    def quantized_fallbacks(self) -> list[dict]:
        """Quantized ops that onnxruntime runs in float (a float kernel reading DQ values),
        each with the reason (``onnx_check.fallback_reason``)."""
        return [f for f in self.fallbacks if f["quantized"]]

    @property
    def float_quantized(self) -> dict[str, int]:
        """Per op type, how many quantized ops onnxruntime runs in float."""
        return dict(sorted(Counter(f["op"] for f in self.quantized_fallbacks).items()))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "float_quantized": self.float_quantized}


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Any, *,
                opset: int = DEFAULT_OPSET, check_inputs: list | None = None,
                conv_integer: bool = False, portable: bool = False, int4: bool = False,
                weight_form: str = "auto", threads: int = 2,
                runtimes: str | tuple[str, ...] = DEFAULT_RUNTIMES) -> ExportReport:
    """Export ``qmodel`` to ``path`` and check it with onnxruntime (and ``runtimes``).

    example_inputs: a Tensor, a tuple of Tensors (positional) or a dict (keyword arguments),
    as for calibration. check_inputs: items of the same form to compare onnxruntime with
    PyTorch on (default: ``[example_inputs]``). conv_integer: rewrite convs whose output is not
    re-quantized to ConvInteger (see ``onnx_rewrite``). portable: standard ONNX operators
    only; int4: store 4-bit weight codes as INT4/UINT4 (opset ≥ 21): half the bytes, but
    neither runtime has a 4-bit conv/matmul kernel, so those layers run in float (by default
    they are int8 codes and run as int8 kernels); by default a Linear's bias is fused into onnxruntime's MatMulIntegerToFloat contrib op
    (``onnx_speed.fuse_matmul_bias``), a contrib op of onnxruntime's that OpenVINO's ONNX
    frontend also reads. weight_form: ``s8`` keeps
    int8 weight codes; ``u8`` stores those onnxruntime's x86 u8×s8 kernels could saturate
    (without VNNI) as uint8 + 128, the same values; ``auto`` picks ``u8`` on such a CPU
    (``onnx_weight_form``). runtimes: names (``export.runtime``) to check the file in;
    onnxruntime is always checked and fills the top-level fields, each other one an entry of
    ``runtime_checks`` (agreement with PyTorch and its int8 census). A missing runtime raises
    ``RuntimeMissingError`` before anything is exported.
    """
    import onnx
    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise OnnxExportError(f"opset {opset} is not supported: use 13 (per-channel "
                              f"DequantizeLinear) to {onnx.defs.onnx_opset_version()}")
    if weight_form not in WEIGHT_FORMS:
        raise OnnxExportError(f"weight_form {weight_form!r} is not known: use one of "
                              f"{', '.join(WEIGHT_FORMS)}")
    form, why = resolve_weight_form(weight_form)
    runtimes = parse_runtimes("onnxruntime", runtimes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        names, state, changes = _export_file(qmodel, tmp, example_inputs, opset, conv_integer,
                                              portable, form == "u8", int4)
        report = ExportReport(str(path), opset, os.path.getsize(tmp), names,
                              state.act_qdq, state.weight_dq, changes.pop("int4_weights"),
                              changes.pop("conv_integer"), state.float_quantizers,
                              state.float_weights, changes, form, why)
        _check(report, tmp, qmodel, check_inputs or [example_inputs], names, threads, runtimes)
    return report


def _export_file(qmodel, tmp: str, example, opset: int, conv_integer: bool, portable: bool,
                 u8_weights: bool, int4: bool):
    """Trace, rewrite and save to ``tmp``; returns (input names, ExportState, rewrite info)."""
    import onnx
    names, args, as_kwargs = _signature(example)
    wrapper, was_training = _FirstOutput(qmodel, names, as_kwargs), qmodel.training
    buf = io.BytesIO()
    try:
        with qdq_export_mode(qmodel) as state, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper.eval(), args, buf, dynamo=False, input_names=names,
                              output_names=["output"],
                              opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              dynamic_axes=_dynamic_axes(names, args))
    except Exception as e:  # the tracer raises many types; name the cause
        raise OnnxExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        qmodel.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    try:
        changes = rewrite(model, conv_int=conv_integer, int4=int4 and opset >= 21, portable=portable,
                          u8_weights=u8_weights)
        onnx.checker.check_model(model)
    except Exception as e:  # a rewrite bug must not leave a broken file behind
        raise OnnxExportError(f"the exported graph failed its checks: {e}") from e
    onnx.save(model, tmp)
    return names, state, changes


def _check(report: ExportReport, path: str, qmodel, items: list, names: list[str],
           threads: int, runtimes: tuple[str, ...]) -> None:
    """Fill the runtime part of ``report``; runtime errors are recorded, not raised."""
    from .onnx_check import compare, concat_padded
    feeds = [dict(zip(names, (t.numpy() for t in _signature(it)[1]))) for it in items]
    ref = concat_padded([reference_output(qmodel, it) for it in items])
    masks = [it["attention_mask"].numpy() for it in items
             if isinstance(it, dict) and "attention_mask" in it]
    mask = concat_padded(masks) if len(masks) == len(items) else None
    for name in runtimes:
        rt = get_runtime(name)
        try:
            census = rt.census(path, threads)
            run = rt.session(path, threads)
            got = concat_padded([run(f) for f in feeds])
        except Exception as e:  # the runtime rejects the model or an op: say so in the report
            err = f"{type(e).__name__}: {e}"
            if name == "onnxruntime":
                report.ort_error = err
            else:
                report.runtime_checks[name] = {"error": err}
            continue
        agreement = compare(ref, got, mask)
        if name == "onnxruntime":
            report.ort_ops, report.fallbacks = census["ops"], census["fallbacks"]
            report.int8_kernels = census["int8_kernels"]
            report.float_compute, report.quant_ops = census["float_compute"], census["quant_ops"]
            report.agreement = agreement
        else:
            report.runtime_checks[name] = {"agreement": agreement, "census": census}


@torch.inference_mode()
def reference_output(model: nn.Module, item: Any) -> np.ndarray:
    """First tensor output of the PyTorch model on one input item, as numpy."""
    names, args, as_kwargs = _signature(item)
    out = model(**dict(zip(names, args))) if as_kwargs else model(*args)
    return first_tensor(out).float().numpy()


def first_tensor(out: Any) -> Tensor:
    """The tensor a model returns, its ``last_hidden_state``, or the first of a tuple/dict."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise OnnxExportError(f"cannot find an output tensor in a {type(out).__name__}")


class _FirstOutput(nn.Module):
    """Positional-tensor front of a model taking a tensor, a tuple or keyword tensors."""

    def __init__(self, model: nn.Module, names: list[str], as_kwargs: bool):
        super().__init__()
        self.model, self.names, self.as_kwargs = model, names, as_kwargs

    def forward(self, *xs: Tensor) -> Tensor:
        out = self.model(**dict(zip(self.names, xs))) if self.as_kwargs else self.model(*xs)
        return first_tensor(out)


def _signature(item: Any) -> tuple[list[str], tuple[Tensor, ...], bool]:
    """(input names, tensors, call with keywords?) of a Tensor / tuple / dict input item."""
    if isinstance(item, Tensor):
        return ["input"], (item,), False
    if isinstance(item, dict):
        names = [k for k, v in item.items() if isinstance(v, Tensor)]
        return names, tuple(item[k] for k in names), True
    if isinstance(item, (tuple, list)) and all(isinstance(t, Tensor) for t in item):
        return [f"input_{i}" for i in range(len(item))], tuple(item), False
    raise OnnxExportError("example inputs must be a Tensor, a tuple of Tensors or a dict of "
                          f"Tensors, got {type(item).__name__}")


def _dynamic_axes(names: list[str], args: tuple[Tensor, ...]) -> dict[str, dict[int, str]]:
    """Batch axis dynamic everywhere; axis 1 too for integer (token id) inputs."""
    axes: dict[str, dict[int, str]] = {}
    seq = False
    for n, t in zip(names, args):
        axes[n] = {0: "batch"}
        if not t.is_floating_point() and t.dim() >= 2:
            axes[n][1] = "sequence"
            seq = True
    axes["output"] = {0: "batch", 1: "sequence"} if seq else {0: "batch"}
    return axes
