"""OpenVINO as a second runtime for the exported ONNX QDQ file: sessions and an int8 census.

OpenVINO's ONNX frontend turns each QuantizeLinear → DequantizeLinear pair into a FakeQuantize
and each integer weight → DequantizeLinear into a dequantisation subgraph; its low-precision
transformations then move the dequantisation past a Convolution/FullyConnected so that the
layer itself reads uint8/int8 data (oneDNN's int8 primitives). Whether that happened is read
from the *compiled* model's runtime graph (``CompiledModel.get_runtime_model()``): per executed
layer, ``layerType``, ``primitiveType`` (``jit_avx2_I8``, ``brgconv_avx2_1x1_f32``, ...) and the
element types of its inputs. A layer counts as int8 when its data input (input 0) is u8/i8;
``runtimePrecision`` alone is not enough (a FullyConnected with f32 activations and uint8
*compressed* weights reports ``u8`` and runs ``brgemm_avx2_f32``).

Compile options (``ov_config``): ``INFERENCE_PRECISION_HINT=f32`` (float parts in f32, never
bf16/f16, so the fp32 baseline is fp32), ``INFERENCE_NUM_THREADS`` = the thread count the
onnxruntime sessions get, ``PERFORMANCE_HINT=LATENCY`` (one stream: one request at a time, as
the bench runs). The model keeps the file's dynamic batch axis; shapes are compiled per first
use by OpenVINO itself.

On x86 CPUs without VNNI oneDNN's u8×s8 int8 kernels use VPMADDUBSW, as onnxruntime's do, and
saturate the same way (``onnx_weight_form``); the ``u8`` weight form (uint8 + 128, zero point
128) is not a symmetric int8 weight, so OpenVINO runs those convs in f32 on dequantised
weights: exact, but float.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})
INT8_TYPES = frozenset({"u8", "i8"})


def ov_config(threads: int) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads),
            "PERFORMANCE_HINT": "LATENCY"}


def compile_model(path: str | Path, threads: int = 2):
    import openvino as ov
    return ov.Core().compile_model(str(path), "CPU", ov_config(threads))


def session(path: str | Path, threads: int = 2) -> Callable[[dict], np.ndarray]:
    """feeds (input name → array) → first output, on one infer request of the compiled file."""
    compiled = compile_model(path, threads)
    request, out = compiled.create_infer_request(), compiled.output(0)
    return lambda feeds: request.infer(feeds, share_inputs=True)[out]


def census(path: str | Path, threads: int = 2) -> dict:
    """Compute layers of the compiled model, int8 or float, per layer type, plus each float
    one with its primitive (``primitiveType``) and the original ONNX nodes it runs."""
    runtime = compile_model(path, threads).get_runtime_model()
    counts: dict[str, Counter] = {}
    float_layers = []
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        kind, names = _text(info, "layerType"), _text(info, "originalLayersNames")
        if kind == "Subgraph" and "MatMul" in names:  # a fused attention (MHA) subgraph
            kind = "Subgraph(MatMul)"
        elif kind not in COMPUTE_LAYERS:
            continue
        data = op.input(0).get_element_type().get_type_name()
        precision = "int8" if data in INT8_TYPES else data
        counts.setdefault(kind, Counter())[precision] += 1
        if precision != "int8":
            float_layers.append({"layer": names.split(",")[-1], "type": kind,
                                 "primitive": _text(info, "primitiveType"), "input": data})
    int8 = sum(c["int8"] for c in counts.values())
    return {"layers": {k: dict(sorted(c.items())) for k, c in sorted(counts.items())},
            "int8_layers": int8, "float_layers": sum(map(sum, (c.values() for c in
                                                              counts.values()))) - int8,
            "float": float_layers}


def _text(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""
