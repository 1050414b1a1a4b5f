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
the bench runs). A session compiles the file for the static input shapes it is fed (see
``session``); the census compiles it with its dynamic axes (layer precisions do not depend on
shapes; some primitives read ``undef`` until a shape is known).

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
SHAPE_CACHE = 4  # compiled models kept per session, one per set of input shapes


def ov_config(threads: int) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads),
            "PERFORMANCE_HINT": "LATENCY"}


def compile_model(path: str | Path, threads: int = 2):
    import openvino as ov
    return ov.Core().compile_model(str(path), "CPU", ov_config(threads))


def session(path: str | Path, threads: int = 2) -> Callable[[dict], np.ndarray]:
    """feeds (input name → array) → first output. The file is compiled once per set of input
    shapes, reshaped to them (static shapes; the last ``SHAPE_CACHE`` kept): on the dynamic
    batch axis OpenVINO's CPU plugin ran ResNet-20 int8 at batch 1 ~5× slower (3.9 vs 0.78 ms,
    under load), which would time shape handling rather than the kernels."""
    import openvino as ov
    core, compiled = ov.Core(), {}

    def run(feeds: dict) -> np.ndarray:
        key = tuple((k, v.shape) for k, v in feeds.items())
        if key not in compiled:
            model = core.read_model(str(path))
            model.reshape({k: list(shape) for k, shape in key})
            c = core.compile_model(model, "CPU", ov_config(threads))
            while len(compiled) >= SHAPE_CACHE:
                compiled.pop(next(iter(compiled)))
            compiled[key] = (c.create_infer_request(), c.output(0))
        request, out = compiled[key]
        return request.infer(feeds, share_inputs=True)[out]
    return run


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
            float_layers.append({"layer": _onnx_name(names), "type": kind,
                                 "primitive": _text(info, "primitiveType"), "input": data})
    int8 = sum(c["int8"] for c in counts.values())
    return {"layers": {k: dict(sorted(c.items())) for k, c in sorted(counts.items())},
            "int8_layers": int8, "float_layers": sum(map(sum, (c.values() for c in
                                                              counts.values()))) - int8,
            "float": float_layers}


def _onnx_name(names: str) -> str:
    """The ONNX node (``/model/...``) among the original layers a runtime layer fuses."""
    parts = [n for n in names.split(",") if n]
    return next((n for n in parts if n.startswith("/")), parts[0] if parts else "")


def _text(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""
