"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterisation for post-LayerNorm activations and
a log√2 quantizer for post-softmax activations, as the published code does it.

1. Post-softmax quantizers (SDPA ``probs``, matmul operands whose graph source is softmax)
   become log√2 quantizers (``quant/log2.py``), Δ among percentiles by MSE.
2. Post-LayerNorm: for every LayerNorm whose output is read only by Linear layers (found from
   the graph, see ``vit_sites``), calibrate a per-channel (last dim) activation quantizer with
   the recipe's observer, Δ_c, z_c, then with Δ̄ = mean Δ_c, z̄ = round(mean z_c),
   min_c = −z_c·Δ_c, min̄ = −z̄·Δ̄:

       r_c = Δ_c / Δ̄,      b_c = min_c / r_c − min̄
       LN:      γ ← γ / r,           β ← β / r − b
       Linear:  W[:, c] ← W[:, c]·r_c,  bias ← bias + W'·b     (W' the rescaled weight)

   which leaves the float function unchanged (checked on one calibration item; reverted if
   not) and every channel on the same grid, so one per-tensor quantizer (Δ̄, z̄) remains.
   z̄ is rounded (the published code keeps the fractional mean) so the zero-point stays an
   integer. A LayerNorm whose output also feeds something else (post-LN BERT: the residual
   add) is left alone — the fold would change the float model there.
3. The weights of the reparameterised layers are re-calibrated.

``method_args``: ``log2_softmax`` (default true), ``reparameterize`` (default true).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ..graph.capture import call_model
from ..quant.granularity import PerChannel
from ..quant.kinds import make_quantizer
from ..quant.quantizer import Mode
from .config import MethodConfig
from .vit_sites import (LNGroup, first_float, ln_linear_groups, observe_only,
                        post_softmax_slots, quantizers_off, recapture, swap_site_quantizer)

EXACT_RTOL = 1e-4  # relative max-abs change of the float output accepted as "unchanged"


class RepQConfig(MethodConfig):
    log2_softmax: bool = True
    reparameterize: bool = True


def apply(model, recipe, batches, *, seed: int = 0, progress: bool = False,
          float_model=None, work_dir=None) -> dict[str, Any]:
    cfg = RepQConfig.parse(recipe.method_args, "repq")
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"log2_sites": 0, "reparameterized": [], "skipped": []}
    if cfg.log2_softmax:
        slots = post_softmax_slots(model)
        observe_only(model, batches, [swap_site_quantizer(model, k, i, "log2sqrt2")
                                      for k, i in slots])
        stats["log2_sites"] = len(slots)
    if cfg.reparameterize and recipe.activations is not None:
        reparameterize(model, batches, stats)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def reparameterize(model, batches, stats: dict) -> None:
    graph = recapture(model, batches[0])
    groups = []
    for g in ln_linear_groups(model, graph):
        usable = g.exclusive and all(_per_tensor_input(model.get_submodule(f))
                                     for f in g.layers)
        (groups if usable else stats["skipped"]).append(g if usable else g.weight)
    if not groups:
        return
    channel_q = calibrate_per_channel(model, batches, groups)
    with torch.no_grad(), quantizers_off(model):
        before = first_float(call_model(model, batches[0])).clone()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    unshifted = []
    for g, q in zip(groups, channel_q):
        if not fold(model, g, q.scale.reshape(-1), q.zero_point.reshape(-1)):
            unshifted += [model.get_submodule(f).input_quantizer for f in g.layers]
        stats["reparameterized"].append(g.weight)
    with torch.no_grad(), quantizers_off(model):
        after = first_float(call_model(model, batches[0]))
    change = ((after - before).abs().max() / before.abs().max().clamp(min=1e-12)).item()
    stats["float_output_rel_change"] = change
    if change > EXACT_RTOL:  # not exact on this graph: undo, keep the per-tensor ranges
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        stats["skipped"] += stats["reparameterized"]
        stats["reparameterized"] = []
        return
    observe_only(model, batches, unshifted)  # scale-only folds: re-fit the per-tensor range
    for g in groups:
        for fqn in g.layers:
            model.get_submodule(fqn).calibrate_weight()


def _per_tensor_input(layer) -> bool:
    q = getattr(layer, "input_quantizer", None)
    return q is not None and q.spec.kind == "uniform" and str(q.spec.granularity) == "per_tensor"


def calibrate_per_channel(model, batches, groups: list[LNGroup]):
    """Per-channel (last dim) quantizers on the input of each group's first layer."""
    temps, originals = [], []
    for g in groups:
        layer = model.get_submodule(g.layers[0])
        spec = layer.input_quantizer.spec.model_copy(update={"granularity": PerChannel(-1)})
        originals.append(layer.input_quantizer)
        layer.input_quantizer = make_quantizer(spec, seed=layer.input_quantizer.seed,
                                               max_samples=layer.input_quantizer.max_samples)
        temps.append(layer.input_quantizer)
    try:
        observe_only(model, batches, temps)
    finally:
        for g, q in zip(groups, originals):
            model.get_submodule(g.layers[0]).input_quantizer = q
    return temps


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
        layer.weight.mul_(r.reshape(1, -1))  # [out, in] · r over input columns
        if layer.bias is not None:
            layer.bias.add_(layer.weight @ b)
        q = layer.input_quantizer
        q.scale = d_mean.reshape(()).clone()
        q.zero_point = z_mean.reshape(()).clone()
        q.mode = Mode.QUANT
    return shifted
