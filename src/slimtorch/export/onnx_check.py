"""Check an exported ONNX file with onnxruntime: does it agree with PyTorch, and which kernels
run in onnxruntime's optimised graph (integer or float)?

The optimised graph is the one onnxruntime executes (``SessionOptions.optimized_model_filepath``
after all graph transformations on the CPU execution provider); its op types tell whether the
QDQ node units were fused into integer kernels (QLinearConv, MatMulIntegerToFloat, ...) or
whether a quantized op falls back to float: a float Conv/MatMul/Gemm/Add (or its fused form)
still reading DequantizeLinear outputs. ``fallback_reason`` names why, from the unit's
neighbourhood in that graph, against the rules of onnxruntime's QDQ selectors
(``optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc``): Conv and the binary ops
become QLinear* only with a QuantizeLinear on their output; on x86 an int8 (signed) activation
is turned into uint8 (``QDQS8ToU8Transformer``) only when its QuantizeLinear has a single
DequantizeLinear consumer; every data input needs its own Q/DQ; there is no 4-bit conv kernel.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearReduceMean", "MatMulNBits", "NhwcQLinearConv",
    "QEmbedLayerNormalization", "QOrderedMatMul"})
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
FLOAT_COMPUTE = frozenset({
    "Conv", "FusedConv", "NchwcConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm",
    "FusedGemm", "Attention", "MultiHeadAttention", "Einsum"})
FLOAT_BINARY = frozenset({"Add", "Mul"})  # QLinearAdd / QLinearMul when quantized on all sides
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm"})  # no output Q needed
LAYOUT_OPS = frozenset({"ReorderInput", "Transpose"})  # between a DQ and an NCHWc/NHWC node


def make_session(path: str | Path, threads: int = 2, optimized_path: str | Path | None = None,
                 profile_prefix: str | Path | None = None):
    """A CPUExecutionProvider session with ``threads`` intra-op threads, all optimisations;
    with ``profile_prefix``, onnxruntime's profiler writes its trace there."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, str(profile_prefix)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_census(path: str | Path, threads: int = 2) -> dict:
    """Op types of onnxruntime's optimised graph, split into int8 kernels, float compute and
    quantize/dequantize ops, plus every float compute node with its reason: ``quantized`` ones
    read dequantized values (the quantized op runs in float), the others are float ops."""
    import onnx
    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        make_session(path, threads, opt)
        graph = onnx.load(str(opt), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    gr = _Index(graph)
    fallbacks = []
    for n in graph.node:
        if n.op_type not in FLOAT_COMPUTE | FLOAT_BINARY:
            continue
        quantized = any(gr.dq(i) is not None for i in n.input[:2])
        if quantized or n.op_type in FLOAT_COMPUTE:
            reason = fallback_reason(gr, n) if quantized else "not quantized: float op"
            fallbacks.append({"node": n.name, "op": n.op_type, "quantized": quantized,
                              "reason": reason})
    return {"ops": dict(sorted(ops.items())),
            "int8_kernels": {k: v for k, v in sorted(ops.items()) if k in INT8_KERNELS},
            "float_compute": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE},
            "quant_ops": {k: v for k, v in sorted(ops.items()) if k in QUANT_OPS},
            "fallbacks": fallbacks}


class _Index:
    """Producers, consumers and integer initializer types of an optimised graph."""

    def __init__(self, graph):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.dtype = {t.name: t.data_type for t in graph.initializer}

    def dq(self, name: str):
        """The DequantizeLinear producing ``name`` (through layout reorders), if any."""
        n = self.producer.get(name)
        while n is not None and n.op_type in LAYOUT_OPS:
            n = self.producer.get(n.input[0])
        return n if n is not None and n.op_type == "DequantizeLinear" else None


def fallback_reason(gr: _Index, node) -> str:
    """Why a float ``node`` that reads dequantized values was not fused into an int8 kernel."""
    import onnx
    kernel = "QLinearConv" if "Conv" in node.op_type else (
        f"QLinear{node.op_type}" if node.op_type in FLOAT_BINARY else "an int8 MatMul kernel")
    for k, name in enumerate(node.input[:2]):
        dq = gr.dq(name)
        if dq is None:
            return f"input {k} has no Q/DQ (a float operand): {kernel} needs both quantized"
        codes_type = gr.dtype.get(dq.input[0])
        if codes_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return "4-bit weight codes: onnxruntime has no 4-bit kernel for this op"
        q = gr.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and _signed(gr, q) \
                and len(gr.consumers.get(q.output[0], [])) > 1:
            return (f"input {k} is a signed int8 activation whose QuantizeLinear has "
                    f"{len(gr.consumers[q.output[0]])} consumers: QDQS8ToU8Transformer makes "
                    "only single-consumer pairs uint8, so no u8 kernel matches")
    if node.op_type not in MATMUL_OPS:  # QLinearConv / QLinearAdd need an output Q
        readers = sorted({c.op_type for c in gr.consumers.get(node.output[0], [])})
        if "QuantizeLinear" not in readers:
            fix = "; conv_integer=True runs it as ConvInteger" if "Conv" in node.op_type else ""
            return (f"output not re-quantized (read by {', '.join(readers) or 'the graph output'}"
                    f"): {kernel} needs a QuantizeLinear after it{fix}")
    return "no onnxruntime QDQ selector matched this unit (op or attributes not supported)"


def _signed(gr: _Index, q) -> bool:
    """Does QuantizeLinear ``q`` produce int8 (its zero point's type; uint8 when omitted)?"""
    import onnx
    return len(q.input) > 2 and gr.dtype.get(q.input[2]) == onnx.TensorProto.INT8


def run_session(session, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """First output of ``session`` over a list of feeds, concatenated along axis 0 (outputs
    of different sequence lengths are padded with zeros on axis 1)."""
    outs = [session.run(None, f)[0] for f in feeds]
    return concat_padded(outs)


def concat_padded(outs: list[np.ndarray]) -> np.ndarray:
    if outs[0].ndim >= 2 and len({o.shape[1:] for o in outs}) > 1:
        width = max(o.shape[1] for o in outs)
        outs = [np.pad(o, [(0, 0), (0, width - o.shape[1])] + [(0, 0)] * (o.ndim - 2))
                for o in outs]
    return np.concatenate(outs, axis=0)


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Agreement of onnxruntime (``got``) with PyTorch (``ref``): max abs/rel diff, and top-1
    agreement for [N, C] logits; otherwise cosine similarity and top-1 retrieval agreement of
    per-sample vectors (mean-pooled over ``mask`` == 1 tokens for [N, T, D] outputs)."""
    diff = np.abs(ref - got)
    out = {"n": int(ref.shape[0]), "max_abs_diff": float(diff.max()),
           "max_rel_diff": float(diff.max() / max(np.abs(ref).max(), 1e-12))}
    if ref.ndim == 2 and ref.shape[1] > 1:
        agree = (ref.argmax(1) == got.argmax(1)).mean()
        out["top1_agreement"] = round(100.0 * float(agree), 3)
        return out
    a, b = (_pool(x, mask) for x in (ref, got))
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    if a.shape[0] >= 2:  # top-1 nearest-neighbour agreement of the pooled embeddings
        import torch
        from ..eval.fidelity import retrieval_agreement
        agree = retrieval_agreement(torch.from_numpy(a).float(), torch.from_numpy(b).float())
        out["retrieval_agreement"] = round(100.0 * agree, 3)
    return out


def _pool(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if x.ndim == 3 and mask is not None:  # [N, T, D] mean over real tokens -> [N, D]
        m = mask[:, : x.shape[1], None].astype(np.float64)
        return (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return x.reshape(x.shape[0], -1).astype(np.float64)


def op_profile(path: str | Path, feeds: dict[str, np.ndarray], *, threads: int = 1,
               runs: int = 20, warmup: int = 3) -> dict:
    """Where onnxruntime spends its time: per op type and per node, the median kernel time
    (ms) per run from onnxruntime's own profiler (``SessionOptions.enable_profiling``)."""
    import json
    with tempfile.TemporaryDirectory() as d:
        sess = make_session(path, threads, profile_prefix=Path(d) / "ort")
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)
            op_of[e["name"]] = e["args"]["op_name"]
    nodes = {n: float(np.median(t[-runs:])) for n, t in per_node.items()}  # drop warm-up
    ops: Counter = Counter()
    for n, ms in nodes.items():
        ops[op_of[n]] += ms
    return {"ops": dict(ops.most_common()), "nodes": [
        {"node": n.removesuffix("_kernel_time"), "op": op_of[n], "ms": ms}
        for n, ms in nodes.items()], "total_ms": float(sum(nodes.values()))}
