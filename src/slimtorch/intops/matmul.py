"""int8 × int8 → int32 matrix product on CPU through ``torch._int_mm``, with an exact fallback.

``torch._int_mm(a [M, K] int8, b [K, N] int8) -> [M, N] int32`` runs oneDNN's VNNI kernels on
CPU. Its shape constraints depend on the build (CUDA requires M > 16 and K, N multiples of 8;
CPU builds accept any shape in torch 2.14). Rather than hard-coding them, the first call for a
(K, N) layout tries the kernel and remembers whether it worked; the fallback multiplies in
float64 through ``F.linear``, which is exact for int8 operands (|Σ| ≤ K·2^14 ≪ 2^53).

Neither path calls ``torch.matmul``/``mm``/``bmm``: the functional-site quantizers intercept
those names inside a quantized model's forward and count them to name attention sites.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SUPPORTED: dict[tuple[int, int, bool], bool] = {}


def int_mm_available() -> bool:
    return hasattr(torch, "_int_mm")


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N], exact."""
    key = (a.shape[1], b.shape[1], a.shape[0] > 16)
    if _SUPPORTED.get(key, int_mm_available()):
        try:
            out = torch._int_mm(a, b)
            _SUPPORTED[key] = True
            return out
        except RuntimeError:
            _SUPPORTED[key] = False
    return F.linear(a.to(torch.float64), b.t().to(torch.float64)).to(torch.int32)


def reference_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """The exact product in int64 (for tests)."""
    return (a.to(torch.int64)[:, :, None] * b.to(torch.int64)[None]).sum(1)
