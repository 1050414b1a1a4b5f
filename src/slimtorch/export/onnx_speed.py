"""ONNX passes that remove quantization overhead onnxruntime would pay on every run.

- ``dedupe_quantize``: QuantizeLinear (then DequantizeLinear) nodes that read the same tensor
  with equal scale and zero point are merged (the q, k and v projections of an attention block
  have three input quantizers calibrated on the same tensor, usually to the same grid). Exact.
- ``gather_then_dequantize``: ``Gather(DQ(codes), ids)`` — an embedding lookup, which would
  dequantize the whole table every run — becomes ``DQ(Gather(codes, ids))``; per-row scales are
  gathered too and applied as (q − z)·s, the DequantizeLinear formula. Exact.
- ``fold_matmul_scale``: ``MatMul(DQ(a), B) · c`` with a positive scalar c (the 1/√d of
  attention scores) becomes ``MatMul(DQ'(a), B)`` with DQ' = DQ with scale s_a·c, so the product
  stays one integer kernel (MatMulIntegerToFloat scales its int32 result by s_a·s_b anyway). The
  result differs from the unfused one by float rounding only (≤ 1 ulp per scale product).
- ``pad_conv_channels``: a conv whose input has a channel count that is not a multiple of 4
  (an RGB stem) misses MLAS's symmetric int8 conv kernel, which packs input channels in fours,
  and falls back to a generic path up to ~2× slower than the fused one (ResNet-20 stem at
  batch 64, 2 threads: 0.75 → 0.36–0.58 ms in two profiles). The float input gets zero channels
  (``Pad`` before its QuantizeLinear: 0 quantizes to the zero point, which dequantizes to 0)
  and the weight codes zero columns. Exact.
- ``fuse_matmul_bias`` (onnxruntime only; skipped by ``portable`` exports): onnxruntime turns
  ``DQ(a)·DQ(W)`` into its MatMulIntegerToFloat kernel but leaves the bias as a separate float
  ``Add`` over the whole output (MiniLM at batch 64: ~35 ms of ~290). The pair becomes one
  ``com.microsoft.MatMulIntegerToFloat(q_a, W, s_a, s_W, z_a, z_W, bias)`` — the node
  onnxruntime would build, with its bias input used; its output is bit-identical to the unfused
  pair's in onnxruntime. The file then needs onnxruntime (the contrib domain).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .onnx_graph import Graph, attrs, replace_node


def _const_key(gr: Graph, name: str) -> tuple | None:
    arr = gr.array(name)
    return None if arr is None else (arr.dtype.str, arr.shape, arr.tobytes())


def _merge(gr: Graph, op: str) -> int:
    """Merge ``op`` nodes with the same data input, equal constant params and attributes."""
    seen, alias, drop = {}, {}, set()
    outputs = {o.name for o in gr.g.output}
    for n in gr.g.node:
        if n.op_type != op or n.output[0] in outputs:
            continue
        params = [_const_key(gr, i) for i in n.input[1:]]
        if any(p is None for p in params):
            continue
        key = (alias.get(n.input[0], n.input[0]), tuple(params), tuple(sorted(attrs(n).items())))
        if key in seen:
            alias[n.output[0]] = seen[key]
            drop.add(n.output[0])
        else:
            seen[key] = n.output[0]
    keep = [n for n in gr.g.node if n.output[0] not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del gr.g.node[:]
    gr.g.node.extend(keep)
    gr.reindex()
    return len(drop)


def dedupe_quantize(gr: Graph) -> int:
    """Merge equal Q nodes, then the DQ nodes that became equal; returns Q nodes removed."""
    merged = _merge(gr, "QuantizeLinear")
    _merge(gr, "DequantizeLinear")
    return merged


def gather_then_dequantize(gr: Graph) -> int:
    count = 0
    for g in [n for n in gr.g.node if n.op_type == "Gather"]:
        dq = gr.weight_dq(g.input[0])
        if dq is None or attrs(g).get("axis", 0) != 0 or len(gr.consumers[dq.output[0]]) != 1:
            continue
        scale = gr.array(dq.input[1])
        if scale.ndim == 1 and attrs(dq).get("axis", 1) not in (0, -gr.array(
                dq.input[0]).ndim):
            continue
        replace_node(gr, g, _gathered_dq(gr, dq, g.input[1], g.output[0], scale.ndim == 0))
        count += 1
    gr.reindex()
    return count


def _gathered_dq(gr: Graph, dq, ids: str, out: str, per_tensor: bool) -> list:
    codes = gr.fresh(out + "_codes")
    nodes = [helper.make_node("Gather", [dq.input[0], ids], [codes], axis=0)]
    if per_tensor:
        return nodes + [helper.make_node("DequantizeLinear", [codes, *dq.input[1:]], [out])]
    zero = not np.any(gr.array(dq.input[2])) if len(dq.input) > 2 else True
    axes = gr.add_init(np.array([-1], dtype=np.int64), "axes")
    qf, s, s_e = (gr.fresh(out + x) for x in ("_qf", "_s", "_s1"))
    nodes += [helper.make_node("Cast", [codes], [qf], to=TensorProto.FLOAT),
              helper.make_node("Gather", [dq.input[1], ids], [s], axis=0),
              helper.make_node("Unsqueeze", [s, axes], [s_e])]
    if not zero:  # q − z, both exact small integers in float
        z, zf, z_e, diff = (gr.fresh(out + x) for x in ("_z", "_zf", "_z1", "_d"))
        nodes += [helper.make_node("Gather", [dq.input[2], ids], [z], axis=0),
                  helper.make_node("Cast", [z], [zf], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", [zf, axes], [z_e]),
                  helper.make_node("Sub", [qf, z_e], [diff])]
        qf = diff
    return nodes + [helper.make_node("Mul", [qf, s_e], [out])]


def fold_matmul_scale(gr: Graph) -> int:
    drop, rename, scales = set(), {}, {}  # Mul outputs, MatMul output -> Mul output, DQ scales
    for m in [n for n in gr.g.node if n.op_type == "Mul"]:
        found = _scaled_matmul(gr, m)
        if found is None or found[0].output[0] in rename or found[1].output[0] in scales:
            continue
        mm, dq, c = found
        s = gr.array(dq.input[1]).astype(np.float32)
        scales[dq.output[0]] = gr.add_init((s * np.float32(c)).astype(np.float32), "scale_x")
        rename[mm.output[0]] = m.output[0]
        drop.add(m.output[0])
    nodes = []
    for n in gr.g.node:  # edit the live nodes, then rebuild the list once
        if n.op_type == "Mul" and n.output[0] in drop:
            continue
        if n.op_type == "DequantizeLinear" and n.output[0] in scales:
            n.input[1] = scales[n.output[0]]
        if n.output[0] in rename:
            n.output[0] = rename[n.output[0]]
        nodes.append(n)
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    gr.reindex()
    return len(drop)


def _scaled_matmul(gr: Graph, m):
    """(MatMul, its activation DQ, c) when ``m`` multiplies a MatMul's output by a scalar c>0."""
    for i in (0, 1):
        c = gr.array(m.input[1 - i])
        mm = gr.producer.get(m.input[i])
        if c is None or c.size != 1 or not float(c.reshape(-1)[0]) > 0 or mm is None \
                or mm.op_type != "MatMul" or len(gr.consumers[mm.output[0]]) != 1:
            continue
        for name in mm.input:
            pair = gr.act_dq(name)
            if pair is not None and gr.array(pair[1].input[1]).ndim == 0 \
                    and len(gr.consumers[name]) == 1:
                return mm, pair[1], float(c.reshape(-1)[0])
    return None


CHANNEL_ALIGN = 4  # input channels MLAS's symmetric int8 conv kernel packs together


def pad_conv_channels(gr: Graph) -> int:
    """Zero-pad the input channels of symmetric-int8 convs to a multiple of CHANNEL_ALIGN."""
    count = 0
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        act, w_dq = gr.act_dq(conv.input[0]), gr.weight_dq(conv.input[1])
        if act is None or w_dq is None or attrs(conv).get("group", 1) != 1:
            continue
        q, dq = act
        codes = gr.array(w_dq.input[0])
        zp = gr.array(w_dq.input[2]) if len(w_dq.input) > 2 else None
        pad = -codes.shape[1] % CHANNEL_ALIGN
        if pad == 0 or codes.dtype != np.int8 or zp is None or np.any(zp) \
                or gr.consumers[q.output[0]] != [dq] or gr.consumers[dq.output[0]] != [conv] \
                or gr.consumers[w_dq.output[0]] != [conv]:
            continue
        padded = np.zeros((codes.shape[0], codes.shape[1] + pad, *codes.shape[2:]), np.int8)
        padded[:, :codes.shape[1]] = codes
        w_dq.input[0] = gr.add_init(padded, w_dq.input[0])
        pads = np.zeros(2 * codes.ndim, np.int64)
        pads[codes.ndim + 1] = pad  # end of the channel axis
        out = gr.fresh(q.input[0] + "_padded")
        node = helper.make_node("Pad", [q.input[0], gr.add_init(pads, "pads"),
                                        gr.add_init(np.zeros((), np.float32), "zero")],
                                [out], mode="constant")
        q.input[0] = out
        replace_node(gr, q, [node, q])
        gr.reindex()
        count += 1
    return count


INT8_CODES = (TensorProto.INT8, TensorProto.UINT8)


def fuse_matmul_bias(gr: Graph) -> int:
    """``MatMul(DQ(q_a), DQ(W)) + b`` → ``com.microsoft.MatMulIntegerToFloat`` with bias."""
    count, outputs = 0, {o.name for o in gr.g.output}
    for mm in [n for n in gr.g.node if n.op_type == "MatMul"]:
        act, w_dq = gr.act_dq(mm.input[0]), gr.weight_dq(mm.input[1])
        users = gr.consumers[mm.output[0]]
        if act is None or w_dq is None or len(users) != 1 or mm.output[0] in outputs:
            continue
        bias = _bias_of(gr, users[0], mm.output[0])
        codes_t = gr.inits.get(gr.resolve(w_dq.input[0]))
        if bias is None or codes_t is None or codes_t.data_type not in INT8_CODES \
                or len(codes_t.dims) != 2 or bias.shape != (codes_t.dims[1],):
            continue
        dq = act[1]
        s_a, s_w = gr.array(dq.input[1]), gr.array(w_dq.input[1])
        if len(dq.input) < 3 or len(w_dq.input) < 3 or s_a is None or s_a.size != 1 \
                or s_w is None or (s_w.ndim == 1 and attrs(w_dq).get("axis", 1) % 2 != 1):
            continue
        node = helper.make_node(
            "MatMulIntegerToFloat",
            [dq.input[0], w_dq.input[0], dq.input[1], w_dq.input[1], dq.input[2],
             w_dq.input[2], gr.add_init(bias.astype(np.float32), "bias")],
            [users[0].output[0]], name=mm.name + "_int", domain="com.microsoft")
        replace_node(gr, mm, [node])
        gr.g.node.remove(users[0])
        gr.reindex()
        count += 1
    if count and not any(o.domain == "com.microsoft" for o in gr.model.opset_import):
        gr.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _bias_of(gr: Graph, node, x: str) -> np.ndarray | None:
    """b when ``node`` computes x + b (Add, either order) or x − c (Sub, b = −c) for a constant
    1-D b."""
    if node.op_type == "Add":
        b = gr.array(node.input[1] if node.input[0] == x else node.input[0])
    elif node.op_type == "Sub" and node.input[0] == x:
        b = gr.array(node.input[1])
        b = None if b is None else -b
    else:
        return None
    return b if b is not None and b.ndim == 1 and b.dtype == np.float32 else None
