"""How 8-bit weight codes are stored so that onnxruntime's x86 int8 kernels compute them exactly.

onnxruntime (MLAS) runs a QDQ Conv/MatMul as a uint8-activation × int8-weight (U8S8) kernel.
On an x86 CPU without VNNI that kernel multiplies with VPMADDUBSW, which sums each pair of
neighbouring products a₀·w₀ + a₁·w₁ in *saturating int16* before widening
(``mlas/lib/x86_64/QgemmU8X8KernelAvx2.S`` and ``ConvSymKernelAvx2.S``: ``vpmaddubsw`` then
``vpmaddwd`` by ones): 2·255·127 = 64 770 > 32 767, so a layer whose codes leave [−64, 64]
can come out wrong (onnxruntime's quantization docs, "When and why do I need to try U8U8?").
With AVX-VNNI / AVX512-VNNI (``vpdpbusds``, int32) or AMX nothing saturates. The U8U8 kernel
zero-extends both operands to int16 and sums pairs with ``vpmaddwd`` in int32
(``QgemmU8X8KernelAvx2.S``): exact.

Weight forms (``export_onnx(weight_form=...)``):

- ``s8``: the artifact's int8 codes as they are.
- ``u8``: the int8 codes w of every weight that can saturate (some |w| > 64: 2·255·64 = 32 640
  still fits int16) feeding a Conv/MatMul/Gemm (or a ConvInteger) are stored as uint8 w + 128
  with zero point z + 128. DequantizeLinear gives (w + 128 − (z + 128))·s = (w − z)·s, the same
  float values bit for bit, and an integer kernel accumulates the same int32 sums; onnxruntime
  then runs its U8U8 kernels (still QLinearConv / MatMulIntegerToFloat / QLinearMatMul).
  Codes within [−64, 64] (7 bits and fewer, INT4-packed weights) stay int8. This is the
  rewrite onnxruntime itself applies at session start when ``session.x64quantprecision`` is
  set (``optimizer/qdq_transformer/avx2_weight_s8_to_u8.cc``, ``s8_to_u8.h``: XOR 0x80, same
  [−64, 64] test), done once in the file so that every session is exact without the option
  (which, in onnxruntime 1.32.0, fails to initialise on our files: their weight zero points
  are shared initialisers and the second rename collides, "Attempt to replace the existing
  tensor").
- ``auto`` (default): ``u8`` when the exporting CPU is x86 without VNNI
  (``eval.machine.u8s8_saturates``), else ``s8``: the file is exact on the CPU that exported
  and checked it. Force ``u8`` for a file meant for unknown x86 CPUs.

OpenVINO (oneDNN's AVX2 int8 kernels, ``jit_avx2_I8``) sums u8×s8 pairs the same saturating
way: the s8 file is as far off there as in onnxruntime (tests/test_onnx_openvino.py). It
reads a ``u8`` weight (zero point 128) as no symmetric int8 weight and runs that layer in f32
on the dequantised weight: exact, but float (``onnx_openvino``).

Weight zero points (``centre_weights``, every form): an asymmetric grid's codes q with
per-channel zero points z (the reconstruction recipes' 2/3/4-bit weights, codes in [0, 2ᵇ − 1]
as uint8) are stored as int8 q − z with zero point 0 whenever every q − z fits int8 (grids of
≤ 7 bits always): DequantizeLinear gives (q − z)·s, the same float values, and the kernels see
symmetric int8 weights. onnxruntime's QDQ selectors and OpenVINO's int8 convolutions need
those: with per-channel uint8 zero points onnxruntime ran 20 of ResNet-20's 21 convs in
float. ≤ 4-bit codes centre to |q − z| ≤ 15, so they never saturate either.

Activations need nothing: onnxruntime turns int8 Q/DQ activation pairs into uint8 itself
(``QDQS8ToU8Transformer``), and an activation × activation product whose operands are both
uint8 runs U8U8.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .onnx_graph import Graph

WEIGHT_FORMS = ("auto", "s8", "u8")
S7_BOUND = 64  # |w| ≤ 64 for every code: no pair of u8×s8 products leaves int16
GEMM_OPS = frozenset({"Conv", "MatMul", "Gemm"})  # read a weight DQ; fused into int8 kernels
OFFSET = 128  # int8 w -> uint8 w + 128 (XOR 0x80), zero point likewise


def resolve_weight_form(form: str) -> tuple[str, str]:
    """(``s8`` | ``u8``, why) for a requested form (one of WEIGHT_FORMS)."""
    from ..eval.machine import cpu_isa, u8s8_saturates
    if form != "auto":
        return form, "requested"
    if u8s8_saturates():
        return "u8", f"auto: x86 CPU without VNNI ({cpu_isa()}): u8×s8 kernels saturate"
    return "s8", f"auto: u8×s8 kernels accumulate in int32 on this CPU ({cpu_isa()})"


def weights_to_u8(gr: Graph) -> int:
    """Store the int8 weight codes that can saturate as uint8 + 128; returns how many."""
    count = 0
    for n in list(gr.g.node):
        if n.op_type == "DequantizeLinear" and _feeds_gemm(gr, n.output[0]):
            count += _to_u8(gr, n, 0, 2)
        elif n.op_type == "ConvInteger":
            count += _to_u8(gr, n, 1, 3)
    gr.reindex()
    return count


def centre_weights(gr: Graph) -> int:
    """Store asymmetric weight codes read by a Conv/MatMul/Gemm as int8 q − z with zero
    point 0 where they fit (same values); returns how many."""
    count = 0
    for n in list(gr.g.node):
        if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] \
                and _feeds_gemm(gr, n.output[0]):
            count += _centre(gr, n)
    gr.reindex()
    return count


def _centre(gr: Graph, dq) -> int:
    codes, zp = gr.array(dq.input[0]), gr.array(dq.input[2])
    if codes is None or zp is None or codes.dtype not in (np.int8, np.uint8) \
            or not zp.any():
        return 0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * codes.ndim
    if zp.ndim == 1:  # per axis: zero points along ``axis``
        shape[axis % codes.ndim] = -1
    centred = codes.astype(np.int16) - zp.astype(np.int16).reshape(shape)
    if centred.size == 0 or int(np.abs(centred).max()) > 127:
        return 0
    dq.input[0] = gr.add_init(centred.astype(np.int8), dq.input[0])
    dq.input[2] = gr.add_init(np.zeros(zp.shape, np.int8), "zp_s8")
    return 1


def _feeds_gemm(gr: Graph, name: str) -> bool:
    return any(c.op_type in GEMM_OPS and name in c.input[:2] for c in gr.consumers[name])


def _to_u8(gr: Graph, node, w_at: int, z_at: int) -> int:
    """Rewrite input ``w_at`` (int8 constant codes) and ``z_at`` (their zero point) of
    ``node`` to uint8 with offset 128, when some code lies outside [−64, 64]."""
    t = gr.inits.get(gr.resolve(node.input[w_at]))
    if t is None or t.data_type != TensorProto.INT8:
        return 0
    codes = gr.array(node.input[w_at]).astype(np.int16)
    if codes.size == 0 or int(np.abs(codes).max()) <= S7_BOUND:
        return 0
    has_zp = len(node.input) > z_at and node.input[z_at]
    zp = gr.array(node.input[z_at]) if has_zp else _default_zp(gr, node, w_at)
    if zp is None or zp.dtype != np.int8:
        return 0
    node.input[w_at] = gr.add_init((codes + OFFSET).astype(np.uint8), node.input[w_at])
    z_u8 = gr.add_init((zp.astype(np.int16) + OFFSET).astype(np.uint8), "zp_u8")
    while len(node.input) <= z_at:  # an omitted optional zero point (and any before it)
        node.input.append("")
    node.input[z_at] = z_u8
    return 1


def _default_zp(gr: Graph, node, w_at: int) -> np.ndarray | None:
    """The implicit int8 zero point 0 of a DQ (shaped like its scale) or a ConvInteger."""
    if node.op_type != "DequantizeLinear":
        return np.zeros((), np.int8)
    scale = gr.array(node.input[1])
    return None if scale is None else np.zeros(scale.shape, np.int8)
