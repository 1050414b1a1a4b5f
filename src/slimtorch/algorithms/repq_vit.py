"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterisation for post-LayerNorm activations and
a log√2 quantizer for post-softmax activations, as the published code does it.

1. Post-softmax quantizers (SDPA ``probs``, matmul operands whose graph source is softmax)
   become log√2 quantizers (``quant/log2.py``), Δ among percentiles by MSE.
2. Post-LayerNorm: for every LayerNorm with an affine whose output is read by Linear layers
   (found from the graph, see ``vit_sites``), calibrate a per-channel (last dim) activation quantizer with
   the recipe's observer, Δ_c, z_c, then with Δ̄ = mean Δ_c, z̄ = round(mean z_c),
   min_c = −z_c·Δ_c, min̄ = −z̄·Δ̄:

       r_c = Δ_c / Δ̄,      b_c = min_c / r_c − min̄
       LN:      γ ← γ / r,           β ← β / r − b
       Linear:  W[:, c] ← W[:, c]·r_c,  bias ← bias + W'·b     (W' the rescaled weight)

   which leaves the float function unchanged (checked on one calibration item; reverted if
   not) and every channel on the same grid, so one per-tensor quantizer (Δ̄, z̄) remains.
   z̄ is rounded (the published code keeps the fractional mean) so the zero-point stays an
   integer.
   Post-LN (BERT): a LayerNorm whose output also feeds something other than those Linear
   layers (the residual add) cannot take the fold — it would change that consumer. Conscious
   deviation (the published code only handles pre-LN ViTs): the map x' = x/r − b is then
   carried by the Linear layers' input quantizers (``quant/reparam.py``, applied also with
   quantizers off), the Linear side of the fold is the same. The quantized result is the
   same as the LN fold would give (per-channel codes on Δ_c, z_c, one per-tensor grid Δ̄, z̄
   at the matmul); the LayerNorm and the residual stay untouched.
   Layers reading the same LayerNorm on different grids (e.g. an 8-bit first layer beside
   4-bit ones) each get their own (r, b), carried by their input quantizers.
3. The weights of the reparameterised layers are re-calibrated (the recipe's observer).

Settings: ``log2_softmax`` (default true), ``reparameterize`` (default true),
``reparam_gelu`` (default false) — an extension that is *not* in the paper: post-GELU layer
inputs (fc2, found from the graph) get the same per-channel calibration and reparameterisation,
carried by their input quantizer (GELU is not affine, so there is nothing to fold it into).
It targets encoders whose post-GELU activations have outlier channels (MiniLM).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from ..graph.capture import call_model
from ..methods import MethodConfig, MethodContext, register_method
from ..quant.granularity import PerChannel
from ..quant.kinds import make_quantizer
from ..quant.prepare import quantizers_off
from ..quant.quantizer import Mode
from .vit_sites import (LNGroup, first_float, ln_linear_groups, observe_only, post_gelu_layers,
                        post_softmax_slots, recapture, set_input_quantizer,
                        swap_input_quantizer, swap_site_quantizer)

EXACT_RTOL = 1e-4  # relative max-abs change of the float output accepted as "unchanged"
# a per-channel quantizer spreads its value sample over C channels: keep 16× the per-tensor
# budget so each channel's range search sees a few hundred values, not a few dozen
CHANNEL_SAMPLES_X = 16


class RepQConfig(MethodConfig):
    log2_softmax: bool = True
    reparameterize: bool = True
    reparam_gelu: bool = Field(False, description="extension, not in the paper: also carry "
                               "the reparameterisation on post-GELU layer inputs")


@register_method("repq", RepQConfig)
def apply(model, cfg: RepQConfig, ctx: MethodContext) -> dict[str, Any]:
    recipe, batches = ctx.recipe, ctx.batches
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"log2_sites": 0, "reparameterized": [], "carried": [],
                             "skipped": []}
    if cfg.log2_softmax:
        slots = post_softmax_slots(model)
        observe_only(model, batches, [swap_site_quantizer(model, k, i, "log2sqrt2")
                                      for k, i in slots])
        stats["log2_sites"] = len(slots)
    if cfg.reparameterize and recipe.activations is not None:
        reparameterize(model, batches, stats, gelu=cfg.reparam_gelu)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def reparameterize(model, batches, stats: dict, gelu: bool = False) -> None:
    graph = recapture(model, batches[0])
    groups = []
    # post-GELU inputs (extension): no LayerNorm to fold into, so always carried
    extra = [LNGroup(f, "", [f]) for f in post_gelu_layers(model)] if gelu else []
    for g in ln_linear_groups(model, graph) + extra:
        usable = all(_per_tensor_input(model.get_submodule(f)) for f in g.layers)
        (groups if usable else stats["skipped"]).append(g if usable else g.weight)
    if not groups:
        return
    channel_q = calibrate_per_channel(model, batches, groups)
    with torch.no_grad(), quantizers_off(model):
        before = first_float(call_model(model, batches[0])).clone()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan_before = _input_quantizers(model, groups)
    unshifted = []
    for g, qs in zip(groups, channel_q):
        if g.exclusive and len({id(q) for q in qs.values()}) == 1:  # one grid: LN fold
            q = qs[g.layers[0]]
            shifted = fold(model, g, q.scale.reshape(-1), q.zero_point.reshape(-1))
            stats["reparameterized"].append(g.weight)
        else:  # post-LN, or layers on different grids: carried by each input quantizer
            shifted = all([carry(model, f, q.scale.reshape(-1), q.zero_point.reshape(-1))
                           for f, q in qs.items()])
            stats["carried"].append(g.weight)
        if not shifted:
            unshifted += [model.get_submodule(f).input_quantizer for f in g.layers]
    with torch.no_grad(), quantizers_off(model):
        after = first_float(call_model(model, batches[0]))
    change = ((after - before).abs().max() / before.abs().max().clamp(min=1e-12)).item()
    stats["float_output_rel_change"] = change
    if change > EXACT_RTOL:  # not exact on this graph: undo, keep the per-tensor ranges
        _undo(model, saved, plan_before, stats)
        return
    observe_only(model, batches, unshifted)  # scale-only folds: re-fit the per-tensor range
    for g in groups:
        for fqn in g.layers:
            model.get_submodule(fqn).calibrate_weight()


def _input_quantizers(model, groups) -> dict:
    """Each layer's input quantizer and a copy of its (Δ, z), to undo the fold."""
    out = {}
    for g in groups:
        for f in g.layers:
            q = model.get_submodule(f).input_quantizer
            out[f] = (q, q.scale.clone(), q.zero_point.clone())
    return out


@torch.no_grad()
def _undo(model, saved: dict, quantizers: dict, stats: dict) -> None:
    for n, p in model.named_parameters():
        p.copy_(saved[n])
    for fqn, (q, scale, zp) in quantizers.items():
        q.scale, q.zero_point = scale, zp
        set_input_quantizer(model, fqn, q)
    stats["skipped"] += stats["reparameterized"] + stats["carried"]
    stats["reparameterized"], stats["carried"] = [], []


def _per_tensor_input(layer) -> bool:
    q = getattr(layer, "input_quantizer", None)
    return q is not None and q.spec.kind == "uniform" and str(q.spec.granularity) == "per_tensor"


def calibrate_per_channel(model, batches, groups: list[LNGroup]) -> list[dict]:
    """Per-channel (last dim) quantizers on each group's layer inputs: one per distinct input
    spec (layers with the same spec read the same tensor, so they share it). Returns, per
    group, {layer fqn: its per-channel quantizer}."""
    out, temps, originals = [], [], {}
    for g in groups:
        by_spec: dict[str, Any] = {}
        keys = {f: model.get_submodule(f).input_quantizer.spec.model_dump_json()
                for f in g.layers}
        for fqn, key in keys.items():
            if key in by_spec:
                continue
            old = originals[fqn] = model.get_submodule(fqn).input_quantizer
            spec = old.spec.model_copy(update={"granularity": PerChannel(-1)})
            by_spec[key] = make_quantizer(spec, seed=old.seed,
                                          max_samples=old.max_samples * CHANNEL_SAMPLES_X)
            model.get_submodule(fqn).input_quantizer = by_spec[key]
            temps.append(by_spec[key])
        out.append({f: by_spec[k] for f, k in keys.items()})
    try:
        observe_only(model, batches, temps)
    finally:
        for fqn, q in originals.items():
            model.get_submodule(fqn).input_quantizer = q
    return out


@torch.no_grad()
def reparam_params(delta: torch.Tensor, zp: torch.Tensor):
    """(r, b, Δ̄, z̄) of RepQ-ViT's scale reparameterisation for per-channel Δ_c, z_c."""
    d_mean, z_mean = delta.mean(), zp.mean().round()
    r = delta / d_mean
    b = (-zp * delta) / r - (-z_mean * d_mean)
    return r, b, d_mean, z_mean


@torch.no_grad()
def fold(model, group: LNGroup, delta: torch.Tensor, zp: torch.Tensor) -> bool:
    """Fold r and b into the LayerNorm affine and the next Linear layers; one quantizer.
    Returns False when a layer has no bias, so only r (not the shift b) could be folded."""
    r, b, d_mean, z_mean = reparam_params(delta.float(), zp.float())
    layers = [model.get_submodule(f) for f in group.layers]
    shifted = all(l.bias is not None for l in layers)
    if not shifted:
        b = torch.zeros_like(b)  # no bias to absorb the shift: scale only
    ln_w, ln_b = model.get_parameter(group.weight), model.get_parameter(group.bias)
    ln_w.div_(r)
    ln_b.copy_(ln_b / r - b)
    for layer in layers:
        _fold_into_layer(layer, layer.input_quantizer, r, b, d_mean, z_mean)
    return shifted


@torch.no_grad()
def carry(model, fqn: str, delta: torch.Tensor, zp: torch.Tensor) -> bool:
    """Post-LN: the same reparameterisation with x' = x/r − b applied by the layer's input
    quantizer (``ReparamQuantizer``) instead of the LayerNorm affine. False: no bias, so
    only r (not the shift b) was carried."""
    r, b, d_mean, z_mean = reparam_params(delta.float(), zp.float())
    layer = model.get_submodule(fqn)
    if layer.bias is None:
        b = torch.zeros_like(b)
    q = swap_input_quantizer(model, fqn, "reparam_uniform")
    q.set_affine(r, b)
    _fold_into_layer(layer, q, r, b, d_mean, z_mean)
    return layer.bias is not None


def _fold_into_layer(layer, q, r, b, d_mean, z_mean) -> None:
    """W[:, c] ← W[:, c]·r_c, bias ← bias + W'·b; the input quantizer becomes (Δ̄, z̄)."""
    layer.weight.mul_(r.reshape(1, -1))  # [out, in] · r over input columns
    if layer.bias is not None:
        layer.bias.add_(layer.weight @ b)
    q.scale = d_mean.reshape(()).clone()
    q.zero_point = z_mean.reshape(()).clone()
    q.mode = Mode.QUANT
