"""ONNX graph passes applied after ``torch.onnx.export`` so onnxruntime finds its int8 kernels.

onnxruntime fuses QDQ node units (``DQ → op → Q``) into integer kernels: Conv → QLinearConv,
MatMul → QLinearMatMul, and ``DQ → MatMul`` with no Q after it → MatMulIntegerToFloat. It
does not fuse ``DQ → Gemm`` without a Q, nor ``DQ → Conv`` without a Q (the output of a conv
that feeds a residual add is float in our models, as in PyTorch). The passes, each keeping the
function unchanged up to float rounding:

- ``constants_to_initializers``: tensor-valued Constant nodes become initializers.
- ``fold_weight_transpose``: ``Transpose(DQ(W))`` → ``DQ(Wᵀ)`` (axis moved with it).
- ``gemm_to_matmul``: ``Gemm(A, DQ(W), C, transB)`` → ``MatMul(A, DQ(Wᵀ)) − (−C)``.
- ``conv_integer`` (opt-in; measured slower than onnxruntime's float conv on DQ weights on
  AVX512-VNNI for the zoo's small convs): a conv on DQ inputs whose output is not re-quantized
  becomes
  ``ConvInteger(q_x, q_w) → Cast → Mul(s_x·s_w) → Add(b)``: the int32 accumulation is exact,
  so the result is the fake-quant conv's (float accumulation) up to float rounding.
- ``pack_int4`` (only with ``int4``): weight codes that fit in 4 bits are stored as INT4/UINT4
  (opset ≥ 21), two per byte; DequantizeLinear reads them directly, but no runtime has a 4-bit
  conv/matmul kernel, so those layers run in float. Without it ``centre_weights``
  (``onnx_weight_form``) stores asymmetric codes as int8 q − z, which the int8 kernels run.
- ``prune``: drop nodes and initializers nothing reads.

``onnx_speed`` adds passes that remove per-run quantization overhead (merged duplicate Q nodes,
embedding lookups on integer codes, attention scale folded into a DQ scale, conv input channels
padded for MLAS's int8 kernel, and — unless the export is ``portable`` — Linear biases fused into
onnxruntime's MatMulIntegerToFloat); ``onnx_weight_form`` stores int8 weight codes as uint8 + 128
where onnxruntime's u8×s8 kernels would saturate (x86 CPUs without VNNI).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_graph import Graph, attrs, replace_node
from .onnx_speed import (dedupe_quantize, fold_matmul_scale, fuse_matmul_bias,
                         gather_then_dequantize, pad_conv_channels)
from .onnx_weight_form import centre_weights, weights_to_u8


def constants_to_initializers(gr: Graph) -> None:
    keep = []
    for n in gr.g.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and value is not None:
            t = onnx.TensorProto()
            t.CopyFrom(value)
            t.name = n.output[0]
            gr.g.initializer.append(t)
        else:
            keep.append(n)
    del gr.g.node[:]
    gr.g.node.extend(keep)
    gr.reindex()


def _transposed_dq(gr: Graph, dq: onnx.NodeProto) -> onnx.NodeProto:
    """A new DQ reading the transposed 2-D codes of ``dq`` (axis 0 <-> 1)."""
    codes = gr.array(dq.input[0])
    inputs = [gr.add_init(np.ascontiguousarray(codes.T), dq.input[0]), *dq.input[1:]]
    a = attrs(dq)
    kw = {}
    if gr.array(dq.input[1]).ndim == 1:  # per-axis
        kw["axis"] = 1 - (a.get("axis", 1) % 2)
    return helper.make_node("DequantizeLinear", inputs, [gr.fresh(dq.output[0])], **kw)


def _is_2d_weight(gr: Graph, dq) -> bool:
    return dq is not None and gr.array(dq.input[0]).ndim == 2


def fold_weight_transpose(gr: Graph) -> None:
    for n in [n for n in gr.g.node if n.op_type == "Transpose"]:
        dq = gr.weight_dq(n.input[0])
        if not _is_2d_weight(gr, dq) or list(attrs(n).get("perm", [1, 0])) != [1, 0]:
            continue
        new = _transposed_dq(gr, dq)
        new.output[0] = n.output[0]
        replace_node(gr, n, [new])
    gr.reindex()


def gemm_to_matmul(gr: Graph) -> None:
    for n in [n for n in gr.g.node if n.op_type == "Gemm"]:
        a, dq = attrs(n), gr.weight_dq(n.input[1])
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 \
                or not _is_2d_weight(gr, dq):
            continue
        w_dq = _transposed_dq(gr, dq) if a.get("transB", 0) else None
        w_name = w_dq.output[0] if w_dq is not None else n.input[1]
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = gr.fresh(n.output[0]) if has_bias else n.output[0]
        new = ([w_dq] if w_dq is not None else []) + [
            helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=n.name + "_mm")]
        if has_bias:
            new.append(_bias_node(gr, mm_out, n.input[2], n.output[0], n.name + "_bias"))
        replace_node(gr, n, new)
    gr.reindex()


def _bias_node(gr: Graph, x: str, bias: str, out: str, name: str) -> onnx.NodeProto:
    """x + b written as x − (−b) (exact): onnxruntime fuses a 2-D MatMul + Add back into a
    float Gemm before its QDQ pass can make it MatMulIntegerToFloat; Sub is left alone."""
    b = gr.array(bias)
    if b is None:
        return helper.make_node("Add", [x, bias], [out], name=name)
    return helper.make_node("Sub", [x, gr.add_init(-b, "neg_bias")], [out], name=name)


def _q_range(gr: Graph, q: onnx.NodeProto) -> tuple[float, float] | None:
    """Real interval a per-tensor QuantizeLinear can represent."""
    s, z = gr.array(q.input[1]), gr.array(q.input[2]) if len(q.input) > 2 else None
    if s is None or s.size != 1 or z is None:
        return None
    info = np.iinfo(z.dtype)
    zf = float(z.reshape(-1)[0])
    return (info.min - zf) * float(s.reshape(-1)[0]), (info.max - zf) * float(s.reshape(-1)[0])


def _fuses_into_q(gr: Graph, out: str) -> bool:
    """Whether onnxruntime can fold this output into a QDQ unit: it feeds only one Q, directly
    or through one Relu/Clip that the Q's range makes redundant (ReluQuantFusion and
    ClipQuantFusion)."""
    users = gr.consumers.get(out, [])
    if len(users) != 1 or out in {o.name for o in gr.g.output}:
        return False
    u = users[0]
    if u.op_type == "QuantizeLinear":
        return True
    if u.op_type not in ("Relu", "Clip"):
        return False
    nxt = gr.consumers.get(u.output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "QuantizeLinear":
        return False
    rng = _q_range(gr, nxt[0])
    if rng is None:
        return False
    lo = 0.0 if u.op_type == "Relu" else _clip_bound(gr, u, 1, -np.inf)
    hi = np.inf if u.op_type == "Relu" else _clip_bound(gr, u, 2, np.inf)
    return lo <= rng[0] + 1e-6 * abs(rng[0]) and rng[1] <= hi * (1 + 1e-6)


def _clip_bound(gr: Graph, node, i: int, default: float) -> float:
    if len(node.input) <= i or not node.input[i]:
        return default
    v = gr.array(node.input[i])
    return default if v is None else float(v.reshape(-1)[0])


def conv_integer(gr: Graph) -> list[str]:
    """Rewrite convs whose output is not re-quantized; returns their node names."""
    done = []
    for n in [n for n in gr.g.node if n.op_type == "Conv"]:
        new = _conv_integer_nodes(gr, n)
        if new is not None and not _fuses_into_q(gr, n.output[0]):
            replace_node(gr, n, new)
            done.append(n.name)
    gr.reindex()
    return done


def _conv_integer_nodes(gr: Graph, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    act, w_dq = gr.act_dq(n.input[0]), gr.weight_dq(n.input[1])
    if act is None or w_dq is None:
        return None
    q, x_dq = act
    x_s, x_z = gr.array(x_dq.input[1]), gr.array(x_dq.input[2])
    w_s, w_z = gr.array(w_dq.input[1]), gr.array(w_dq.input[2])
    codes = gr.array(w_dq.input[0])
    if x_s is None or x_s.size != 1 or x_z is None or x_z.dtype != np.uint8 \
            or w_z is None or np.any(w_z != w_z.reshape(-1)[0]) or codes.dtype.itemsize != 1:
        return None
    rank = codes.ndim
    shape = [1, -1] + [1] * (rank - 2)  # broadcast [O] over [N, O, *spatial]
    mult = (x_s.astype(np.float32) * w_s.astype(np.float32)).reshape(-1)
    mult = np.broadcast_to(mult, (codes.shape[0],)).reshape(shape).astype(np.float32)
    acc, acc_f, scaled = (gr.fresh(n.output[0] + s) for s in ("_i32", "_f32", "_scaled"))
    has_bias = len(n.input) > 2 and n.input[2]
    w_zp = gr.add_init(w_z.reshape(-1)[:1].reshape(()), "w_zp")
    out = [helper.make_node("ConvInteger", [q.output[0], w_dq.input[0], x_dq.input[2], w_zp],
                            [acc], name=n.name + "_int", **attrs(n)),
           helper.make_node("Cast", [acc], [acc_f], to=TensorProto.FLOAT),
           helper.make_node("Mul", [acc_f, gr.add_init(mult, "mult")],
                            [scaled if has_bias else n.output[0]])]
    if has_bias:
        bias = gr.array(n.input[2]).reshape(shape).astype(np.float32)
        out.append(helper.make_node("Add", [scaled, gr.add_init(bias, "bias")],
                                    [n.output[0]]))
    return out


def _int4_tensor(arr: np.ndarray, name: str) -> onnx.TensorProto | None:
    """INT4/UINT4 tensor of int8/uint8 codes that fit in 4 bits, else None."""
    lo, hi, dtype = ((-8, 7, TensorProto.INT4) if arr.dtype == np.int8 else
                     (0, 15, TensorProto.UINT4) if arr.dtype == np.uint8 else (1, 0, None))
    if dtype is None or arr.size == 0 or arr.min() < lo or arr.max() > hi:
        return None
    nib = (arr.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    nib = np.append(nib, np.uint8(0)) if nib.size % 2 else nib
    packed = nib[0::2] | (nib[1::2] << 4)  # first element in the low nibble (ONNX spec)
    return helper.make_tensor(name, dtype, arr.shape, packed.tobytes(), raw=True)


def pack_int4(gr: Graph) -> int:
    """Store 4-bit weight codes (and their zero points) as INT4/UINT4; returns how many."""
    count = 0
    for n in [n for n in gr.g.node if n.op_type == "DequantizeLinear"]:
        if gr.array(n.input[0]) is None or len(n.input) < 3:
            continue
        codes, zp = gr.array(n.input[0]), gr.array(n.input[2])
        c4, z4 = _int4_tensor(codes, "c"), _int4_tensor(zp, "z") if zp is not None else None
        if c4 is None or z4 is None or codes.size < 16:
            continue
        n.input[0], n.input[2] = gr.add_init(c4, n.input[0]), gr.add_init(z4, n.input[2])
        count += 1
    gr.reindex()
    return count


def prune(gr: Graph) -> None:
    """Remove nodes whose outputs nobody reads and initializers no node reads."""
    live = {o.name for o in gr.g.output}
    keep = []
    for n in reversed(list(gr.g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(n.input)
    del gr.g.node[:]
    gr.g.node.extend(reversed(keep))
    inits = [t for t in gr.g.initializer if t.name in live]
    del gr.g.initializer[:]
    gr.g.initializer.extend(inits)
    gr.reindex()


def rewrite(model: onnx.ModelProto, *, conv_int: bool = False, int4: bool = False,
            portable: bool = False, u8_weights: bool = False) -> dict:
    """Run every pass on ``model`` in place; returns what was changed. ``portable``: standard
    ONNX operators only (no onnxruntime contrib ops); ``u8_weights``: the ``u8`` weight form
    (``onnx_weight_form``)."""
    gr = Graph(model)
    constants_to_initializers(gr)
    fold_weight_transpose(gr)
    gemm_to_matmul(gr)
    done = conv_integer(gr) if conv_int else []
    info = {"conv_integer": done, "merged_quantize": dedupe_quantize(gr),
            "gather_dequantize": gather_then_dequantize(gr),
            "folded_matmul_scales": fold_matmul_scale(gr),
            "padded_conv_channels": pad_conv_channels(gr)}  # on int8 codes: before u8
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    info["int4_weights"] = pack_int4(gr) if int4 and opset >= 21 else 0  # before centring
    info["centred_weights"] = centre_weights(gr)
    info["u8_weights"] = weights_to_u8(gr) if u8_weights else 0
    info["fused_matmul_bias"] = 0 if portable else fuse_matmul_bias(gr)  # after int4 packing
    prune(gr)
    return info
