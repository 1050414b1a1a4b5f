"""PTQ4ViT (Yuan et al., ECCV 2022): twin-uniform quantizers and a Hessian-guided scale search.

1. Post-softmax quantizers (SDPA ``probs``, softmax-sourced matmul operands) and post-GELU
   layer inputs become twin-uniform quantizers (``quant/twin.py``), initialised by MSE.
2. For every unit — a quantized Linear/Conv (weight + input quantizer) or a functional site
   (matmul a, b; SDPA q, k, probs, v) — search each quantizer's interval among the candidates
   (α + i(β−α)/100)·Δ₀, i = 0…100, α = 0.01, β = 1.2 (plus Δ₀ itself, so the search never
   ends worse than it started), for twin post-softmax quantizers among the splits 2^−i,
   i = 0…19; 3 alternating rounds (weights, then activations / operand by operand). Score:
   −Σ (g ⊙ (O − Ô))², O the unit's float output on float inputs ("parallel" calibration: each
   unit sees raw float inputs), Ô with the candidate, g the gradient at the unit's output of
   the loss below. Per-channel weight intervals are searched per output channel (channel o of
   the output depends only on row o of the weight, so the per-channel optimum is exact).
   Default: 32 calibration items (``calib_items``), like the paper's 32 images.

Decisions (documented deviations):
* g. The published "parallel" calibrator takes g with every quantizer in raw (float) mode,
  i.e. of KL(p‖p), whose gradient is zero (hahnyuan/PTQ4ViT#23) so the weighting degenerates.
  Here g is taken once on the model quantized at its initial (MSE) intervals.
* Loss. ``target: auto``: KL(softmax(float) ‖ softmax(model)) over the last dim when the
  prediction (first floating output) is 2-D [batch, classes]; otherwise — an encoder whose
  output is a hidden state, e.g. MiniLM's ``last_hidden_state`` [B, T, D] — the squared error
  ½‖y_float − y‖² summed over features, averaged over tokens (KL over a softmax of hidden
  features has no meaning). ``kl`` / ``mse`` force one.
* Search. ``search: coarse_to_fine`` (default) scores every 5th candidate and then the 9 grid
  points around the best (≈ 30 of the 101; the same answer where the score is unimodal in the
  interval); ``exhaustive`` scores all 101. Token rows per unit are capped (``max_rows``).
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..graph.capture import call_model
from ..methods import MethodConfig, MethodContext, register_method
from ..quant.functional import quantized_sdpa
from ..quant.prepare import quant_layers, quantizers_off
from ..quant.quantizer import Mode, Quantizer
from ..quant.twin import SPLITS, TwinUniformQuantizer
from .vit_sites import (first_float, observe_only, post_gelu_layers,
                        post_softmax_slots, sites_of, swap_input_quantizer,
                        swap_site_quantizer)


class PTQ4ViTConfig(MethodConfig):
    calib_items: int = Field(32, ge=1, description="calibration items used for the search")
    rounds: int = Field(3, ge=1)
    alpha: float = Field(0.01, gt=0)
    beta: float = Field(1.2, gt=0)
    steps: int = Field(100, ge=2, description="candidate i = 0..steps")
    search: Literal["coarse_to_fine", "exhaustive"] = "coarse_to_fine"
    target: Literal["auto", "kl", "mse"] = "auto"
    twin: bool = True
    max_rows: int = Field(2048, ge=16, description="token rows kept per Linear unit")

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        if self.target != "auto":
            return {}
        with torch.no_grad(), quantizers_off(model):  # the prediction's shape decides
            pred = first_float(call_model(model, ctx.batches[0]))
        return {"target": "kl" if pred.dim() == 2 else "mse"}


@register_method("ptq4vit", PTQ4ViTConfig)
def apply(model, cfg: PTQ4ViTConfig, ctx: MethodContext) -> dict[str, Any]:
    batches, seed = ctx.batches, ctx.seed
    t0 = time.perf_counter()
    batches = _first_items(batches, cfg.calib_items)
    if cfg.twin:
        twins = [swap_site_quantizer(model, k, i, "twin_uniform")
                 for k, i in post_softmax_slots(model)]
        twins += [swap_input_quantizer(model, f, "twin_uniform") for f in post_gelu_layers(model)]
        observe_only(model, batches, twins)
    units = collect(model, batches, cfg, seed)
    stats = {"units": {}, "items": sum(_batch_len(b) for b in batches)}
    for name, unit in units.items():
        before = unit.error()
        for _ in range(cfg.rounds):
            for q in unit.quantizers():
                if isinstance(unit, LinearUnit):
                    unit.hold(q)
                search_quantizer(unit, q, cfg)
                if isinstance(unit, LinearUnit):
                    unit.hold(None)
        stats["units"][name] = {"before": before, "after": unit.error()}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


# ---------------------------------------------------------------- calibration data
def _batch_len(item) -> int:
    t = next(v for v in (item.values() if isinstance(item, dict) else
                         item if isinstance(item, (tuple, list)) else [item])
             if isinstance(v, torch.Tensor))
    return t.shape[0]


def _first_items(batches: list, n: int) -> list:
    out, count = [], 0
    for b in batches:
        if count >= n:
            break
        out.append(b)
        count += _batch_len(b)
    return out


class LinearUnit:
    """A quantized Conv/Linear: cached float input rows X, float output O, gradient G."""

    def __init__(self, layer):
        self.layer, self.x, self.o, self.g = layer, [], [], []
        self.fixed: dict[str, torch.Tensor] = {}  # quantized side held fixed during a search

    def quantizers(self) -> list[Quantizer]:
        return [q for q in (self.layer.weight_quantizer, self.layer.input_quantizer)
                if q is not None and q.mode is Mode.QUANT]

    def finish(self) -> None:
        self.x, self.o, self.g = (torch.cat(v) for v in (self.x, self.o, self.g))

    def hold(self, searched: Quantizer | None) -> None:
        """Cache the quantized operand that does not depend on ``searched``."""
        self.fixed = {}
        if searched is None:
            return
        if searched is not self.layer.weight_quantizer:
            self.fixed["w"] = self._w()
        if searched is not self.layer.input_quantizer:
            self.fixed["x"] = self._x()

    def _w(self) -> torch.Tensor:
        layer = self.layer
        w = layer.weight_quantizer(layer.weight) if layer.weight_quantizer else layer.weight
        return w.reshape(w.shape[0], -1)  # [out, in]

    def _x(self) -> torch.Tensor:
        return self.layer.input_quantizer(self.x) if self.layer.input_quantizer else self.x

    @torch.no_grad()
    def output(self) -> torch.Tensor:
        w = self.fixed["w"] if "w" in self.fixed else self._w()
        x = self.fixed["x"] if "x" in self.fixed else self._x()
        return F.linear(x, w, self.layer.bias)  # [R, out]

    def channel_error(self) -> torch.Tensor:
        return (self.g * (self.o - self.output())).square().sum(0)  # [out]

    def error(self) -> float:
        return self.channel_error().sum().item()


class SiteUnit:
    """A functional site (matmul / SDPA): cached float operands, output and gradient."""

    def __init__(self, kind: str, qs):
        self.kind, self.qs, self.args, self.kwargs, self.o, self.g = kind, qs, [], [], [], []

    def quantizers(self) -> list[Quantizer]:
        return [q for q in self.qs if q.mode is Mode.QUANT]

    def finish(self) -> None:
        pass

    @torch.no_grad()
    def error(self) -> float:
        total = 0.0
        for args, kwargs, o, g in zip(self.args, self.kwargs, self.o, self.g):
            if self.kind == "matmul":
                out = torch.matmul(self.qs[0](args[0]), self.qs[1](args[1]))
            else:
                out = quantized_sdpa(self.qs, *args, **kwargs)
            total += (g * (o - out)).square().sum().item()
        return total


def _prediction_loss(pred: torch.Tensor, ref: torch.Tensor, target: str) -> torch.Tensor:
    if target == "kl" or (target == "auto" and pred.dim() == 2):
        return F.kl_div(F.log_softmax(pred.flatten(0, -2), -1),
                        F.softmax(ref.flatten(0, -2), -1), reduction="batchmean")
    return 0.5 * (pred - ref).square().sum(-1).mean()


def collect(model, batches: list, cfg: PTQ4ViTConfig, seed: int) -> dict[str, Any]:
    """Float inputs/outputs of every unit (all quantizers off) and the gradient at each unit
    output of the prediction loss (model quantized at its current intervals)."""
    units: dict[str, Any] = {n: LinearUnit(m) for n, m in quant_layers(model)
                             if m.weight_quantizer is not None or m.input_quantizer is not None}
    units = {n: u for n, u in units.items()  # Linear layers (convs/embeddings keep MSE init)
             if u.quantizers() and isinstance(u.layer, torch.nn.Linear)}
    sites = sites_of(model)
    rows = max(1, cfg.max_rows // len(batches))
    outs: dict[str, torch.Tensor] = {}

    def linear_hook(name, grad_pass, b):
        def hook(module, args, out):
            if grad_pass:
                outs[name] = out
                return
            x, o = args[0].detach().reshape(-1, args[0].shape[-1]), out.detach()
            idx = _rows(o.numel() // o.shape[-1], rows, seed, name, b)
            units[name].x.append(x[idx])
            units[name].o.append(o.reshape(-1, o.shape[-1])[idx])
        return hook

    def tap(grad_pass):
        def fn(key, kind, args, kwargs, out):
            name = f"site:{key}"
            if name not in units:
                units[name] = SiteUnit(kind, sites.site(key))
            if grad_pass:
                outs[name] = out
            else:
                units[name].args.append([a.detach() for a in args[:3]])
                units[name].kwargs.append(kwargs)
                units[name].o.append(out.detach())
        return fn

    params = [p for p in model.parameters()]
    req = [p.requires_grad for p in params]
    try:
        for b, item in enumerate(batches):
            with torch.no_grad(), quantizers_off(model), _hooks(model, units, linear_hook,
                                                                 sites, tap, False, b):
                ref = first_float(call_model(model, item)).detach()
            for p in params:
                p.requires_grad_(True)
            outs.clear()
            with torch.enable_grad(), _hooks(model, units, linear_hook, sites, tap, True, b):
                loss = _prediction_loss(first_float(call_model(model, item)), ref, cfg.target)
                names = [n for n in outs if outs[n].requires_grad]
                grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                g = torch.zeros_like(outs[n]) if g is None else g.detach()
                u = units[n]
                if isinstance(u, LinearUnit):
                    g = g.reshape(-1, g.shape[-1])
                    u.g.append(g[_rows(g.shape[0], rows, seed, n, b)])
                else:
                    u.g.append(g)
            outs.clear()
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
    units = {n: u for n, u in units.items() if len(u.g) == len(u.o) and len(u.o)}
    for u in units.values():
        u.finish()
    return units


class _hooks:
    def __init__(self, model, units, linear_hook, sites, tap, grad_pass, b):
        self.handles = [u.layer.register_forward_hook(linear_hook(n, grad_pass, b))
                        for n, u in units.items() if isinstance(u, LinearUnit)]
        self.sites = sites
        if sites is not None:
            sites.tap = tap(grad_pass)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        if self.sites is not None:
            self.sites.tap = None


def _rows(total: int, k: int, seed: int, name: str, b: int) -> torch.Tensor:
    """The same seeded subset of row indices in the float and the gradient pass."""
    if total <= k:
        return torch.arange(total)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{b}".encode()))
    return torch.randperm(total, generator=gen)[:k]


# ---------------------------------------------------------------- search
def _state(q: Quantizer) -> dict[str, torch.Tensor]:
    names = ["scale"] + (["scale_high", "split"] if isinstance(q, TwinUniformQuantizer) else [])
    return {n: getattr(q, n).clone() for n in names}


def _set(q: Quantizer, state: dict[str, torch.Tensor]) -> None:
    for n, v in state.items():
        setattr(q, n, v.clone())


def _candidates(q: Quantizer, cfg: PTQ4ViTConfig) -> list[float]:
    return [cfg.alpha + i * (cfg.beta - cfg.alpha) / cfg.steps for i in range(cfg.steps + 1)]


def _apply_multiplier(q: Quantizer, base: dict, m) -> None:
    """Candidate interval m·Δ₀ (m a float or a per-row tensor broadcast to the scale)."""
    if isinstance(q, TwinUniformQuantizer):  # signed twin: the positive range is searched
        q.scale_high = base["scale_high"] * m
        return
    m = torch.as_tensor(m, dtype=base["scale"].dtype)
    if m.dim() and base["scale"].dim():
        m = m.reshape(-1, *[1] * (base["scale"].dim() - 1))
    q.scale = base["scale"] * m


@torch.no_grad()
def search_quantizer(unit, q: Quantizer, cfg: PTQ4ViTConfig) -> None:
    base = _state(q)
    if isinstance(q, TwinUniformQuantizer) and q.softmax_form:
        n = q.levels
        best = min(SPLITS, key=lambda t: (q.set_twin(t / n, 1 / n, t), unit.error())[1])
        q.set_twin(best / n, 1 / n, best)
        if unit.error() > _error_with(unit, q, base):
            _set(q, base)
        return
    per_channel = (isinstance(unit, LinearUnit) and q is unit.layer.weight_quantizer
                   and base["scale"].dim() > 0 and base["scale"].shape[0] > 1)
    grid = _candidates(q, cfg)
    score = (unit.channel_error if per_channel else
             (lambda: torch.tensor([unit.error()])))
    idx = (range(0, len(grid), 5) if cfg.search == "coarse_to_fine" else range(len(grid)))
    best_err, best_m = _evaluate(q, base, score, [1.0] + [grid[i] for i in idx], per_channel)
    if cfg.search == "coarse_to_fine":
        step = (cfg.beta - cfg.alpha) / cfg.steps
        fine = [(best_m + j * step).clamp(cfg.alpha, cfg.beta) for j in range(-4, 5)]
        fine_err, fine_m = _evaluate(q, base, score, fine, per_channel)
        better = fine_err < best_err
        best_m = torch.where(better, fine_m, best_m)
    _apply_multiplier(q, base, best_m if per_channel else best_m.item())


def _evaluate(q, base, score, cands, per_channel):
    """Best multiplier (per row of the score) among ``cands`` (floats or per-row tensors)."""
    best_err = best_m = None
    for m in cands:
        _apply_multiplier(q, base, m if per_channel or not torch.is_tensor(m) else m.item())
        err = score()
        m_t = torch.as_tensor(m, dtype=err.dtype).expand_as(err) if not torch.is_tensor(m) \
            else m.reshape(-1).expand_as(err)
        if best_err is None:
            best_err, best_m = err.clone(), m_t.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better, m_t, best_m)
    return best_err, best_m


def _error_with(unit, q, state) -> float:
    cur = _state(q)
    _set(q, state)
    err = unit.error()
    _set(q, cur)
    return err
