"""GPTQ (Frantar et al., ICLR 2023): quantize a layer's weight column by column, and after each
column spread its rounding error over the columns not yet quantized, by the inverse Hessian of
the layer-wise problem  min ‖W X − Ŵ X‖²  (OBS/OBQ, Frantar & Alistarh 2022).

Per layer, on the layer-wise runner (``runner/layerwise.py``):
- H = 2/N · Σ x xᵀ over the N input columns the layer saw (``add_batch``): a Linear's input
  rows, a convolution's unfolded patches (one H per group; a depthwise conv has one 9×9 H per
  channel, all solved at once as a batch);
- inputs never non-zero in calibration (H_ii = 0): H_ii = 1, which leaves them uncoupled, so
  their weights are rounded to nearest. The public code sets those weights to 0 instead, which
  is right for an input that is always 0 — but an input that was 0 on the calibration set
  (a ReLU6 channel no calibration photo excites) need not be 0 later: on EfficientNet-Lite2,
  zeroing cost the late 1×1 convolutions 20 dB of output SQNR on held-out photos;
- damping H += λ·mean(diag H)·I, λ = ``damp`` (1 %); if the Cholesky factorisation still fails,
  λ is raised ×10 (at most 3 times; recorded);
- fewer input columns than inputs (N < n: H is singular, e.g. a classifier with fewer
  calibration images than features): the layer keeps round-to-nearest, since GPTQ would fit
  the calibration set's null space (on EfficientNet-Lite2's classifier, +16.5 dB of proxy error
  on calibration, −0.4 dB on held-out photos); recorded as ``kept_rtn``;
- U = chol(H⁻¹)ᵀ (upper); for each block of ``block_size`` (128) columns, for column i:
  q_i = Q(w_i) on the layer's grid, e_i = (w_i − q_i) / U_ii, w_j −= e_i · U_ij (j > i in the
  block); after the block, the columns right of it take the block's error at once
  (W_:,>b −= E U_b,>b) — the "lazy batch" update, equal to updating after every column;
- ``act_order``: columns in order of decreasing H_ii (the public code's ``--act-order``).

Choices where the public code offers several: the grid is the recipe's (scale and zero point
from its observer). Per-group grids are fitted when GPTQ reaches a group's first column, on the
group's columns as the error feedback has left them (the public code's default; it reads them
before the current block's in-block updates, we read them after — the values that get rounded),
unless ``static_groups`` (the code's ``--static-groups``: every group fitted before GPTQ on the
original weight), which ``act_order`` needs so that groups stay contiguous columns. The inputs are those of the partly quantized model — earlier layers done,
activation quantization on as the recipe has it — which is GPTQ's sequential mode; layers are
solved one at a time in graph order (``sequential: layer``, the code's ``--true-sequential``)
or all layers of a residual block from one collection (``sequential: unit``). Statistics per
layer: the proxy error tr(ΔW H ΔWᵀ) of round-to-nearest and of GPTQ, and their ratio in dB.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import CalibrationDataError, CalibrationWarning, RecipeError
from ..methods import MethodConfig, MethodContext, register_method
from ..quant.granularity import PerGroup
from ..quant.quantizer import Quantizer, qparams_from_range, search_range
from ..runner.layerwise import solve_layers

UNFOLD_CHUNK = 1 << 25  # elements of input columns per step (128 MB of float32)


class GPTQConfig(MethodConfig):
    block_size: int = Field(128, ge=1, description="columns per lazy-batch block")
    damp: float = Field(0.01, gt=0, le=1, description="λ: damping as a fraction of mean diag H")
    act_order: bool = Field(False, description="quantize columns by decreasing H_ii")
    static_groups: bool | None = Field(
        None, description="per-group grids fitted before GPTQ on the original weight (True) or "
        "at each group's first column on the updated weight (False); None: True with "
        "act_order, else False")
    sequential: Literal["layer", "unit"] = Field(
        "layer", description="layer: re-collect inputs after each layer (true sequential); "
        "unit: one collection per residual block")
    max_columns: int | None = Field(
        65536, ge=1, description="input columns sampled per calibration batch (seeded); "
        "None: all")


# ============================================================== the algorithm (pure)
def quantize_column(w: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest of ``w`` on the grid (s, z), dequantized."""
    return (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s


def proxy_error(dw: Tensor, h: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) summed over groups: ΔW [g, r, n], H [g, n, n]."""
    return float(torch.einsum("grn,gnm,grm->", dw.double(), h.double(), dw.double()))


def inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """U = chol(H⁻¹) upper, of the damped H [g, n, n]; returns U and the λ that worked."""
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)  # [g]
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    for attempt in range(4):
        lam = damp * 10 ** attempt
        hd = h + lam * mean_diag[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if not bool(info.any()):
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if not bool(info.any()):
                return u, lam
    raise ValueError("the layer's input Hessian is not positive definite even with "
                     f"damping {lam}: feed more calibration samples")


@torch.no_grad()
def gptq(w: Tensor, h: Tensor, s: Tensor | None, z: Tensor | None, qmin: int, qmax: int, *,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         refit: tuple[int, Callable[[Tensor], tuple[Tensor, Tensor]]] | None = None,
         prune: tuple[int, Callable[[Tensor, Tensor], Tensor]] | None = None
         ) -> tuple[Tensor, dict[str, Any]]:
    """GPTQ of ``w`` [g, r, n] (g groups of r rows over n input columns) with Hessians
    ``h`` [g, n, n] on the grid ``s``, ``z`` (shaped like w). Returns the dequantized Q and
    statistics (module docstring; ``stats["scale"], stats["zero_point"]`` the grid used).
    ``refit = (size, fit)``: at every ``size``-th column, ``fit(columns [g, r, size])`` gives
    that quantization group's scale and zero point [g, r] from the current columns.
    ``prune = (period, choose)``: SparseGPT's mask selection — at every ``period``-th column,
    ``choose(columns [g, r, period], U_ii [g, period])`` gives the keep-mask of those columns
    (as the error feedback has left them); a pruned weight becomes 0 and its whole value is
    the error spread over the later columns (``stats["keep"]``: the mask). ``s`` None: no
    rounding (pruning only)."""
    w, h = w.clone().float(), h.clone().float()
    if s is not None:
        s, z = s.expand_as(w).float().clone(), z.expand_as(w).float().clone()
    if refit is not None and (act_order or block_size % refit[0]):
        raise ValueError("per-group refitting needs columns in order and blocks made of "
                         "whole groups")
    if prune is not None and (act_order or block_size % prune[0]):
        raise ValueError("mask selection needs columns in order and blocks made of whole "
                         "selection periods")
    keep = torch.ones_like(w, dtype=torch.bool)
    rtn_err = (0.0 if s is None else
               proxy_error(quantize_column(w, s, z, qmin, qmax) - w, h))
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # an input never seen: no coupling, so it is rounded to nearest
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [g, n]
        w, s, z = (t.gather(-1, perm[:, None, :].expand_as(t)) for t in (w, s, z))
        h = h.gather(-1, perm[:, None, :].expand_as(h)).gather(-2, perm[:, :, None].expand_as(h))
    u, lam = inverse_cholesky(h, damp)
    q = torch.zeros_like(w)
    n = w.shape[-1]
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        w1, u1 = w[..., b0:b1].clone(), u[:, b0:b1, b0:b1]
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            if prune is not None and i % prune[0] == 0:  # choose the next columns' mask
                span = slice(b0 + i, b0 + i + prune[0])
                keep[..., span] = prune[1](w1[..., i: i + prune[0]],
                                           torch.diagonal(u1, dim1=-2, dim2=-1)[:, i: i + prune[0]])
            if refit is not None and (b0 + i) % refit[0] == 0:  # a group starts: fit its grid
                gs, gz = refit[1](w1[..., i: i + refit[0]])
                s[..., b0 + i: b0 + i + refit[0]] = gs[..., None]
                z[..., b0 + i: b0 + i + refit[0]] = gz[..., None]
            col = w1[..., i]                                              # [g, r]
            qc = col if s is None else quantize_column(col, s[..., b0 + i], z[..., b0 + i],
                                                       qmin, qmax)
            qc = qc * keep[..., b0 + i]
            q[..., b0 + i] = qc
            e = (col - qc) / u1[:, i, i][:, None]                         # [g, r]
            w1[..., i:] -= e[..., None] * u1[:, i, i:][:, None, :]
            err[..., i] = e
        w[..., b1:] -= err @ u[:, b0:b1, b1:]
    if perm is not None:
        q = q.gather(-1, torch.argsort(perm, dim=-1)[:, None, :].expand_as(q))
    return q, {"rtn_error": rtn_err, "damp": lam, "scale": s, "zero_point": z, "keep": keep}


# ============================================================== the layer solver
def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(groups, n columns per group) of the layer's weight."""
    groups = getattr(layer, "groups", 1) if isinstance(layer, nn.modules.conv._ConvNd) else 1
    return groups, layer.weight[0].numel()


def _conv2d_geometry(layer: nn.Module, x: Tensor) -> tuple[Tensor, tuple, tuple, tuple]:
    """A Conv1d/Conv2d input as 4-D [B, C, H, W] with the layer's kernel, stride, padding and
    dilation as 2-tuples."""
    if isinstance(layer, nn.Conv1d):
        return (x.unsqueeze(2), (1, layer.kernel_size[0]), (1, layer.stride[0]),
                (0, layer.padding[0]), (1, layer.dilation[0]))
    return x, layer.kernel_size, layer.stride, layer.padding, layer.dilation


def input_rows(layer: nn.Module, x: Tensor, max_rows: int | None = None,
               gen: torch.Generator | None = None) -> Tensor:
    """The layer's input as the vectors its weight rows multiply, [g, M, n]: a Linear's input
    rows, a convolution's input patch at every output position (n ordered like the weight's
    (channel, kh, kw)). With ``max_rows``, a seeded uniform sample of that many positions when
    there are more — gathered from the padded input, never unfolding all of it."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[torch.randperm(len(rows), generator=gen)[:max_rows].sort().values]
        return rows[None]
    x, k, st, pad, dil = _conv2d_geometry(layer, x)
    b, c = x.shape[:2]
    ho = (x.shape[2] + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // st[0] + 1
    wo = (x.shape[3] + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // st[1] + 1
    pos = torch.arange(b * ho * wo)
    if max_rows is not None and len(pos) > max_rows:
        pos = torch.randperm(len(pos), generator=gen)[:max_rows].sort().values
    taps = torch.cartesian_prod(torch.arange(k[0]) * dil[0], torch.arange(k[1]) * dil[1])
    img = (pos // (ho * wo))[:, None]
    r = ((pos // wo) % ho * st[0])[:, None] + taps[:, 0]               # [P, kh·kw]
    q = (pos % wo * st[1])[:, None] + taps[:, 1]
    xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    g, p, kk = layer.groups, len(pos), k[0] * k[1]
    if c == g:  # depthwise: gather channel-first, [C, P, k] is already [g, P, n]
        return xp.transpose(0, 1)[:, img, r, q]
    patches = xp.permute(0, 2, 3, 1).contiguous()[img, r, q]           # [P, k, C]
    patches = patches.reshape(p, kk, g, c // g).permute(2, 0, 3, 1)     # [g, P, C/g, k]
    return patches.reshape(g, p, -1)                                   # [g, P, (C/g)·k]


def unsupported(layer: nn.Module) -> str | None:
    """Why GPTQ cannot solve this layer, or None."""
    wq = getattr(layer, "weight_quantizer", None)
    if wq is None or getattr(layer, "frozen", False):
        return "no weight quantizer"
    if type(wq) is not Quantizer:
        return f"{type(wq).__name__} weights (GPTQ rounds on a uniform grid)"
    why = unsolvable(layer)
    if why is not None:
        return why
    gran = wq.spec.gran
    if getattr(gran, "axis", 0) != 0:
        return f"weights quantized {gran} (GPTQ needs rows = output channels)"
    return None


def unsolvable(layer: nn.Module) -> str | None:
    """Why a layer's input Hessian cannot be built (its kind or padding), or None."""
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return f"{type(layer).__name__} (GPTQ needs a Linear or Conv1d/2d input)"
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r}/{layer.padding_mode} (only explicit zero padding)"
        if getattr(type(layer), "float_cls", None) is not None and "forward" in vars(type(layer)):
            return f"{type(layer).float_cls.__name__} computes its own forward"
    return None


class GPTQSolver:
    """Accumulates H for one layer and solves it (``runner.layerwise.LayerSolver``)."""

    def __init__(self, layer: nn.Module, cfg: GPTQConfig, seed: int = 0):
        self.layer, self.cfg = layer, cfg
        self.groups, n = layer_shape(layer)
        self.h = torch.zeros(self.groups, n, n)
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add_batch(self, x: Tensor) -> None:
        x = x.detach().float()
        if self.cfg.max_columns is None:  # every column, a few samples at a time
            per = max(1, x[:1].numel() * math.prod(getattr(self.layer, "kernel_size", (1,))))
            parts = x.split(max(1, UNFOLD_CHUNK // per))
        else:
            parts = (x,)
        for xs in parts:
            rows = input_rows(self.layer, xs, self.cfg.max_columns, self.gen)  # [g, M, n]
            self.h.baddbmm_(rows.transpose(1, 2), rows)
            self.count += rows.shape[1]

    def solve(self) -> dict[str, Any]:
        layer, wq = self.layer, self.layer.weight_quantizer
        w = layer.weight.detach()
        shape = w.shape
        g = self.groups
        n = self.h.shape[-1]
        if self.count < n:
            return {"kept_rtn": f"{self.count} input columns for {n} inputs: H is singular",
                    "columns": self.count, "inputs": n}
        h = self.h * (2.0 / max(1, self.count))
        grid = [t.expand_as(wq.layout(w)).reshape(g, shape[0] // g, -1) for t in
                (wq.scale, wq.zero_point)]
        refit = self._refit(wq)
        q, st = gptq(w.reshape(g, shape[0] // g, -1), h, *grid, wq.qmin, wq.qmax,
                     block_size=self.cfg.block_size, damp=self.cfg.damp,
                     act_order=self.cfg.act_order, refit=refit)
        err = proxy_error(q - w.reshape(q.shape).float(), h)
        layer.weight.data.copy_(q.reshape(shape).to(w.dtype))
        if refit is not None:  # the quantizer holds the grid the codes were rounded on
            size = refit[0]
            wq.scale = st["scale"][..., ::size].reshape(wq.scale.shape).to(wq.scale.dtype)
            wq.zero_point = st["zero_point"][..., ::size].reshape(wq.zero_point.shape).to(
                wq.zero_point.dtype)
        gain = 10 * math.log10(st["rtn_error"] / err) if err > 0 and st["rtn_error"] > 0 else 0.0
        return {"rtn_error": st["rtn_error"], "gptq_error": err, "gain_db": round(gain, 2),
                "damp": st["damp"], "columns": self.count}

    def _refit(self, wq: Quantizer):
        """(group size, fit) for per-group grids fitted during GPTQ, or None (static)."""
        static = self.cfg.act_order if self.cfg.static_groups is None else self.cfg.static_groups
        if static or not isinstance(wq.spec.gran, PerGroup):
            return None
        size = wq.spec.gran.size
        if self.cfg.block_size % size:
            raise RecipeError(f"GPTQ block_size {self.cfg.block_size} is not a multiple of the "
                             f"weight group size {size}: set static_groups: true or a "
                             "block_size made of whole groups")

        def fit(cols: Tensor) -> tuple[Tensor, Tensor]:  # [g, r, size] -> [g, r] each
            rows = cols.reshape(-1, size)
            sc, zp = qparams_from_range(*search_range(rows, wq.spec), wq.spec.bits,
                                        wq.spec.symmetric)
            return sc.reshape(cols.shape[:-1]), zp.reshape(cols.shape[:-1])
        return size, fit

    def free(self) -> None:
        self.h = None


@register_method("gptq", GPTQConfig)
def apply(model, cfg: GPTQConfig, ctx: MethodContext) -> dict[str, Any]:
    seeds = itertools.count(ctx.seed * 1_000_003)

    def make(name: str, layer: nn.Module):
        return unsupported(layer) or GPTQSolver(layer, cfg, seed=next(seeds))
    acts_on = ctx.recipe.activations is not None
    out = solve_layers(model, ctx, make, sequential=cfg.sequential, acts_on=acts_on,
                       desc="gptq")
    _check_columns(out["layers"])
    return out


def _check_columns(layers: dict[str, dict]) -> None:
    """Too little calibration data for GPTQ: an error when no layer could be solved, a
    warning naming the layers that kept round-to-nearest otherwise."""
    kept = {f: st for f, st in layers.items() if "kept_rtn" in st}
    if not kept:
        return
    need = max(st["inputs"] for st in kept.values())
    fix = (f"feed at least {need} input rows per layer (for an LLM: calibration tokens, "
           "`--calib-size` segments × their length; for a CNN classifier: images)")
    if len(kept) == len(layers):
        raise CalibrationDataError(f"GPTQ could solve no layer: each saw fewer calibration "
                                   f"input rows than it has inputs (H is singular); {fix}")
    names = ", ".join(list(kept)[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    warnings.warn(f"GPTQ kept round-to-nearest for {len(kept)} of {len(layers)} layers "
                  f"({names}): fewer calibration input rows than inputs; {fix}",
                  CalibrationWarning, stacklevel=3)
