"""Residual-stream rotation (QuaRot: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in
Rotated LLMs", 2024), fused into the weights: exact in float, flatter activations to quantize.

In a pre-norm decoder the residual stream x [tokens, d] is written by the embedding and by the
Linears whose outputs are added to it (o_proj, down_proj), and read only through RMSNorms.
RMSNorm(x·Q) = RMSNorm(x)·Q for an orthogonal Q once the norm's scale γ is moved into the
Linears that read it, so with x' = x·Q (rows)

    E ← E·Q                    every embedding writing the stream
    W ← Qᵀ·W,  b ← b·Q        every Linear writing the stream ([out = d, in])
    W ← W·diag(γ)·Q,  γ ← 1    every Linear reading a norm of the stream ([out, in = d])

the model computes the same function (lm_head reads the final norm like any reader: a tied
lm_head/embedding is untied first, since W_head·diag(γ)·Q ≠ E·Q; the artifact records it and
``load`` unties again). Q = D·H/√d, a Hadamard matrix with seeded random signs (``hadamard``),
which spreads every outlier channel over all channels.

The structure is found from the captured graph, not from module names: the stream starts at
the first Embedding's output and continues through re-layouts and through every two-operand
add whose other operand is a layer's output (the writers); readers are the Linear groups of
``channel_scales.scale_groups`` whose input is computed from the stream without a layer in
between. Where the rotation would not be exact this raises ``RotationError`` naming the place:
a normalisation that subtracts the mean (LayerNorm: x·Q's mean is not x's mean·Q), a norm with
a bias, a norm output that other ops also read, a residual add of something no layer computes,
an explicit input scale from a method run earlier (put ``rotate`` first). As a last guard the
float output on one calibration sample must stay within 1e-3 relative, else ``RotationError``.
Afterwards the pipeline's ``calibrate`` re-fits every weight and activation range.

``online: true`` adds QuaRot's online Hadamard on the MLP's hidden activations: every residual
writer that does not read an attention output (down_proj) gets x ← x·H at run time as its
input rotation (``QuantLayerMixin.set_input_rotation``: Kronecker factors A ⊗ B = H/√n, e.g.
1536 = 128·12, applied on x reshaped [..., 128, 12]) and W ← W·H offline. Unlike the paper's
CUDA kernel this is plain matmuls; the per-head Hadamard on V/O is not done. Layers with an
input rotation are left out of channel scaling (SmoothQuant/AWQ would scale rotated columns).

Follows the paper and its public code (spcl/QuaRot ``rotation_utils.py``: fuse the norms, then
rotate embeddings, attention inputs/outputs, MLP inputs/outputs and the head) for the offline
part; the public code draws Q once per model, as here (``seed``: the recipe's seed unless set).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import RotationError
from ..graph.capture import users_of
from ..graph.rewrite import tied_parameters, untie_parameters
from ..methods import MethodConfig, MethodContext, register_method
from ..quant.modules import QuantLayerMixin
from ..quant.prepare import META_ATTR, calibrate
from .channel_scales import (NORM_KINDS, ScaleGroup, _back, _safe, float_output,
                             relative_change, scale_groups)
from .hadamard import kron_factors, rotation
from .vit_sites import recapture

MAX_REL_CHANGE = 1e-3
# ops by which a normalisation would subtract the mean (not invariant under rotation)
CENTERING = {"sub", "__sub__", "__rsub__", "sub_", "var", "std", "var_mean", "std_mean"}


class RotateConfig(MethodConfig):
    seed: int | None = Field(None, description="seed of the random signs of Q (None: the "
                             "recipe's seed)")
    online: bool = Field(False, description="also an online Hadamard at the input of every "
                         "residual writer that does not read attention (the MLP's down_proj)")


@dataclass
class Residual:
    """Where the residual stream of width ``dim`` is written and read."""

    dim: int
    embeddings: list[str]                              # Embedding fqns writing it
    writers: list[str]                                 # Linear fqns whose outputs are added
    readers: list[ScaleGroup] = field(default_factory=list)  # norm → Linear groups
    raw_readers: list[str] = field(default_factory=list)     # Linears reading it directly

    def record(self) -> dict[str, Any]:
        return {"dim": self.dim, "embeddings": self.embeddings, "writers": self.writers,
                "readers": [g.record() for g in self.readers], "raw_readers": self.raw_readers}


# ------------------------------------------------------------------ finding the stream
def _stream(graph, start: int, layer_at: dict[int, str]) -> tuple[set[int], list[str]]:
    """Stream nodes from the embedding output ``start`` and the layers adding into it."""
    nodes, users = graph.nodes, users_of(graph.nodes)
    stream, writers, todo = {start}, [], [start]
    while todo:
        s = todo.pop()
        for u in users.get(s, []):
            n = nodes[u]
            if u in stream:
                continue
            if _safe(graph, n) and n.shape == nodes[s].shape:
                stream.add(u)
                todo.append(u)
            elif n.kind == "add" and len(n.inputs) == 2 and n.shape == nodes[s].shape:
                other = n.inputs[1] if n.inputs[0] == s else n.inputs[0]
                w = _back(graph, other)
                if w not in layer_at:
                    raise RotationError(
                        f"the residual add in {n.module or 'the model'} adds the output of "
                        f"{nodes[w].op!r}, not of a Linear/Embedding: a rotation cannot be "
                        "fused into it; leave `rotate` out of this recipe")
                writers.append(layer_at[w])
                stream.add(u)
                todo.append(u)
    return stream, writers


def _path_to_stream(graph, x: int, stream: set[int], layer_at: dict[int, str]
                    ) -> tuple[bool, list]:
    """(whether ``x`` is computed from the stream with no layer in between, the ops on that
    path)."""
    seen, todo, ops, hit = {x}, [x], [], False
    while todo:
        i = todo.pop()
        if i in stream:
            hit = True
            continue
        if i in layer_at or graph.nodes[i].kind in ("input", "sdpa", "matmul"):
            return False, []
        ops.append(graph.nodes[i])
        for j in graph.nodes[i].inputs:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return hit, ops


def _check_norm(group: ScaleGroup, ops: list) -> None:
    where = group.layers[0]
    bad = [n for n in ops if n.kind in NORM_KINDS - {"rms_norm"} or n.kind == "group_norm"
           or n.op in CENTERING]
    if bad:
        raise RotationError(
            f"the normalisation read by {where} subtracts the mean ({bad[0].op} in "
            f"{bad[0].module or 'the model'}): LayerNorm is not invariant under a rotation of "
            "the residual stream; `rotate` needs RMSNorm models (Llama-like decoders)")
    if group.fold != "norm":
        raise RotationError(f"the norm read by {', '.join(group.layers)} cannot take its scale "
                            f"into them ({group.why or group.fold}); `rotate` needs a norm "
                            "read only by Linear layers (pre-norm decoders)")
    if len(group.params) != 1:
        raise RotationError(f"the norm read by {where} has a bias ({group.params[1:]}): "
                            "x·Q + b is not a rotation of x + b; remove `rotate`")


def find_residual(model: nn.Module, batches: list) -> Residual:
    """The residual stream's embeddings, writers and readers (module docstring)."""
    graph = recapture(model, batches[0])
    layer_at = {l["node"]: l["fqn"] for l in graph.layers
                if isinstance(model.get_submodule(l["fqn"]), (nn.Linear, nn.Embedding))}
    embeds = [l for l in graph.layers if isinstance(model.get_submodule(l["fqn"]), nn.Embedding)]
    if not embeds:
        raise RotationError("`rotate` rotates a decoder's residual stream, which starts at a "
                            "token embedding; this model has no nn.Embedding")
    stream, writers = _stream(graph, embeds[0]["node"], layer_at)
    dim = graph.nodes[embeds[0]["node"]].shape[-1]
    res = Residual(dim, [embeds[0]["fqn"]] + [w for w in writers if isinstance(
        model.get_submodule(w), nn.Embedding)], [w for w in writers if isinstance(
            model.get_submodule(w), nn.Linear)])
    linears = {f for f in layer_at.values() if isinstance(model.get_submodule(f), nn.Linear)}
    node_of = {f: n for n, f in layer_at.items()}
    for g in scale_groups(model, batches, linears):
        x = _back(graph, graph.nodes[node_of[g.layers[0]]].inputs[0])
        if x in stream:
            res.raw_readers += g.layers
            continue
        hit, ops = _path_to_stream(graph, x, stream, layer_at)
        if hit:
            _check_norm(g, ops)
            res.readers.append(g)
    if not res.readers and not res.raw_readers:
        raise RotationError("no Linear layer reads the residual stream through a norm; "
                            "nothing to rotate")
    return res


# ------------------------------------------------------------------ applying Q
@torch.no_grad()
def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(p.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, res: Residual, q: Tensor) -> None:
    """Fuse x ← x·Q into the weights (module docstring); ``q`` [d, d] float64 orthogonal."""
    for f in res.embeddings:
        e = model.get_submodule(f).weight
        _set(e, e.double() @ q)                                        # [vocab, d]·Q
    for f in res.writers:
        m = model.get_submodule(f)
        _set(m.weight, q.T @ m.weight.double())                        # Qᵀ·[d, in]
        if m.bias is not None:
            _set(m.bias, m.bias.double() @ q)
    for g in res.readers:
        gamma = model.get_parameter(g.params[0])
        for f in g.layers:
            w = model.get_submodule(f).weight
            _set(w, (w.double() * gamma.double()[None, :]) @ q)        # [out, d]·diag(γ)·Q
        gamma.fill_(1.0)
    for f in res.raw_readers:
        w = model.get_submodule(f).weight
        _set(w, w.double() @ q)


# ------------------------------------------------------------------ online Hadamard
def _reads_attention(graph, idx: int, layer_at: dict[int, str]) -> bool:
    """Whether node ``idx`` is computed from an attention (SDPA or softmax) with no layer in
    between."""
    seen, todo = {idx}, [idx]
    while todo:
        i = todo.pop()
        n = graph.nodes[i]
        if n.kind in ("sdpa", "softmax"):
            return True
        if i in layer_at and i != idx:
            continue
        for j in n.inputs:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return False


@torch.no_grad()
def online_hadamard(model: nn.Module, batches: list, writers: list[str]) -> dict[str, Any]:
    """x ← x·H at run time (the layer's input rotation A ⊗ B = H/√n), W ← W·H offline, on each
    writer that reads no attention (QuaRot's online Hadamard before down_proj): exact, since
    (x·H)(W·H)ᵀ = x·Wᵀ. Returns {fqn: [a, b]} and {fqn: why not}."""
    graph = recapture(model, batches[0])
    layer_at = {l["node"]: l["fqn"] for l in graph.layers}
    node_of = {f: n for n, f in layer_at.items()}
    meta_layers = getattr(model, META_ATTR)["plan"]["layers"]
    done, skipped = {}, {}
    for f in writers:
        if _reads_attention(graph, graph.nodes[node_of[f]].inputs[0], layer_at):
            continue
        m = model.get_submodule(f)
        factors = kron_factors(m.in_features)
        if not isinstance(m, QuantLayerMixin) or f not in meta_layers:
            skipped[f] = "not quantized: an online rotation only pays before a quantizer"
        elif factors is None:
            skipped[f] = f"no Hadamard construction for {m.in_features} input features"
        else:
            a, b = factors
            _set(m.weight, m.weight.double() @ torch.kron(a, b))           # [out, n]·H
            m.set_input_rotation(a, b)
            meta_layers[f]["input_rotation"] = [a.shape[0], b.shape[0]]
            done[f] = [a.shape[0], b.shape[0]]
    return {"layers": done, "skipped": skipped}


def _check_no_input_scale(model: nn.Module, res: Residual) -> None:
    layers = [f for g in res.readers for f in g.layers] + res.writers + res.raw_readers
    scaled = [f for f in layers if getattr(model.get_submodule(f), "input_scale", None)
              is not None]
    if scaled:
        raise RotationError(f"{scaled[0]} already divides its input by an explicit scale (a "
                            "channel-scaling method ran before): list `rotate` first in "
                            "`methods:`")


@register_method("rotate", RotateConfig)
def apply(model, cfg: RotateConfig, ctx: MethodContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    untied = tied_parameters(model)
    untie_parameters(model, untied)
    meta = getattr(model, META_ATTR)
    meta["untied"] = sorted(set(meta.get("untied", [])) | set(untied))
    res = find_residual(model, ctx.batches)
    _check_no_input_scale(model, res)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    q, info = rotation(res.dim, seed)
    before = float_output(model, ctx.batches[0])
    rotate_residual(model, res, q)
    online = online_hadamard(model, ctx.batches, res.writers) if cfg.online else None
    change = relative_change(before, float_output(model, ctx.batches[0]))
    if not change <= MAX_REL_CHANGE:
        raise RotationError(f"the rotated model's float output changed by {change:.2e} "
                            "(relative): some op reads the residual stream in a way the "
                            "rotation does not cover; remove `rotate` for this model")
    calibrate(model, ctx.batches, progress=ctx.progress)  # ranges of the rotated weights/inputs
    return {"rotation": info, "seed": seed, **res.record(), "untied": untied,
            **({"online": online} if online is not None else {}),
            "float_output_rel_change": change, "seconds": round(time.perf_counter() - t0, 2)}
