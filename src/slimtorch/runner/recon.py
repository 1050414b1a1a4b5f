"""Block-sequential reconstruction, written once for AdaRound, BRECQ, QDrop and PD-Quant.

Units come from the QuantGraph (``units.partition``): the layers of a residual block form one unit
(run as the smallest module holding the block's layers and its add), stem and classifier are
their own units, the remaining layers are grouped by their module (≤ ``max_group`` layers).

For each unit, in graph order (``reconstruct``):
1. cache, for every calibration image, the unit's float input x_fp and float output (all
   quantizers off) and its input x_q in the current quantized model (earlier units done) —
   carried over from the previous unit when this unit reads its output (``units.chained``),
   else collected by runs of the model prefix;
2. let the stage's terms adjust the float input and target (PD-Quant: distribution
   correction, ``pd.py``);
3. optimise AdaRound V (``learned.AdaRound``) and/or LSQ activation step sizes of the unit
   on ‖unit(x) − target‖² (+ λ·round regulariser, + the terms' losses), x = x_q or the QDrop
   mix;
4. harden the rounding, record the loss before/after on the whole cache, persist the state.

A ``UnitTerm`` is the pluggable part of a stage: it may set itself up once per run, correct a
unit's cached float input/target, and add a loss on the unit's output for the pure quantized
input (appended to each batch). The runner knows no method beyond that interface.

Cached tensors live in a ``CachePool`` (bounded RAM, spill to disk; ``recon_cache.py``). Every
random draw of a unit comes from a generator seeded by (seed, stage, unit index), so a run
resumed from its work dir repeats the uninterrupted run bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.cache import CachePool
from ..methods import MethodContext
from ..quant.prepare import distinct, quant_layers, quant_state
from ..quant.quantizer import Mode, Quantizer
from .learned import LSQ, AdaRound, adaround_of
from .recon_cache import WorkDir, collect, fingerprint, n_samples, unit_map
from .units import Unit, chained, pack_args, unit_fn


# ============================================================== config
@dataclass(frozen=True)
class Stage:
    """One pass of reconstruction over all units (what is learned, from which input)."""

    name: str
    iters: int
    learn_weights: bool          # AdaRound V
    learn_acts: bool             # LSQ step sizes of the unit's activation quantizers
    acts_on: bool                # activation quantization on in the whole model
    batch_size: int = 32
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    round_weight: float = 0.01   # λ
    warmup: float = 0.2
    b_range: tuple[float, float] = (20.0, 2.0)
    rec_p: float = 2.0           # exponent of the reconstruction error
    mix_prob: float = 0.0        # QDrop: P(unit input element comes from x_q); 0 = always x_q
    drop_prob: float = 0.0       # QDrop: P(in-unit activation element stays float)
    terms: tuple = ()            # UnitTerm objects (PD-Quant: pd.PDTerm)
    rounding: type = AdaRound    # the learned-rounding class (Attention Round: its subclass)


class UnitTerm:
    """A pluggable part of a stage; every hook is optional (the defaults do nothing)."""

    def setup(self, ctx: "Context") -> None:
        """Once per run, before the first unit (e.g. cache the float model's outputs)."""

    def correct(self, ctx: "Context", unit: Unit, x_fp: Tensor, y_fp: Tensor
                ) -> tuple[Tensor, Tensor, dict]:
        """The unit's float input and target to reconstruct from, and stats to record."""
        return x_fp, y_fp, {}

    def bind(self, ctx: "Context", mod: nn.Module, y_fp: Tensor
             ) -> tuple[Callable[[Tensor, Tensor], Tensor] | None, dict]:
        """A loss ``fn(unit output on the pure quantized input, sample indices)`` for this unit
        (None: no loss), and stats to record."""
        return None, {}


# ============================================================== formulas
def beta_at(t: int, iters: int, warmup: float, b_range: tuple[float, float]) -> float | None:
    """β of the round regulariser at step t; None during warm-up (no regulariser).
    Linear decay b_start → b_end after the first ``warmup`` fraction of the steps."""
    start = warmup * iters
    if t < start:
        return None
    rel = (t - start) / max(1.0, iters - start)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel)


def rec_loss(pred: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """|pred − target|^p summed over the channel dim, mean over batch and the rest."""
    d = (pred - target).abs()
    return (d.square() if p == 2.0 else d.pow(p)).sum(1).mean()


def mix_inputs(x_q: Tensor, x_fp: Tensor, prob: float, gen: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """QDrop: element-wise x_q with probability ``prob`` else x_fp. Returns (x, mask)."""
    mask = torch.rand(x_q.shape, generator=gen) < prob
    return torch.where(mask, x_q, x_fp), mask


class QDrop:
    """QDrop's random drop, a forward hook on each of the unit's activation quantizers: in QUANT
    mode an element keeps its quantized value with p = 1 − ``prob``, else its float input; the
    quantizers that read the unit input (``boundary``) follow the mix mask (``mask``) instead.
    Draws come from ``gen`` (never the global RNG)."""

    def __init__(self, quantizers: list[Quantizer], boundary: list[Quantizer], prob: float,
                 gen: torch.Generator):
        self.prob, self.gen, self.mask = prob, gen, None
        self.boundary = {id(q) for q in boundary}
        self.hooks = [q.register_forward_hook(self._hook) for q in quantizers]

    def _hook(self, q: Quantizer, args: tuple, out: Tensor) -> Tensor | None:
        mask = self.mask if id(q) in self.boundary else None
        if q.mode is not Mode.QUANT or (mask is None and self.prob <= 0):
            return None
        x = args[0]
        keep = mask if mask is not None and mask.shape == x.shape else (
            torch.rand(x.shape, generator=self.gen, dtype=x.dtype) >= self.prob)
        return torch.where(keep, out, x)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def eval_loss(unit: nn.Module, xs: Tensor, ys: Tensor, p: float, chunk: int = 256) -> float:
    tot = 0.0
    for i in range(0, len(xs), chunk):
        tot += rec_loss(unit(xs[i:i + chunk]), ys[i:i + chunk], p).item() * len(xs[i:i + chunk])
    return tot / len(xs)


# ============================================================== the runner
@dataclass
class Context:
    """Everything shared by the units of a run."""

    model: nn.Module
    batches: list
    seed: int
    pool: CachePool
    work: WorkDir
    progress: bool = False
    float_model: nn.Module | None = None
    bn_folds: list = field(default_factory=list)


def unit_quantizers(model: nn.Module, unit: Unit) -> tuple[list, list[Quantizer]]:
    layers = [(f, model.get_submodule(f)) for f in unit.layers]
    ws = [(f, m) for f, m in layers if m.weight_quantizer is not None and not m.frozen]
    acts = [m.input_quantizer for _, m in layers if m.input_quantizer is not None]
    return ws, distinct(acts)


def _boundary(unit_mod: nn.Module, acts: list[Quantizer], x: Tensor) -> list[Quantizer]:
    """The unit's activation quantizers that read the unit input itself."""
    hit: list[Quantizer] = []
    hooks = [q.register_forward_pre_hook(
        lambda m, a: hit.append(m) if a[0].data_ptr() == x.data_ptr()
        and a[0].shape == x.shape else None) for q in acts]
    try:
        with torch.no_grad():
            unit_mod(x)
    finally:
        for h in hooks:
            h.remove()
    return hit


def reconstruct(ctx: Context, units: list[Unit], stage: Stage, stage_idx: int = 0,
                chain: list[bool] | None = None) -> list[dict]:
    """Every unit of one stage. ``chain[k]`` (``units.chained``): unit k reads unit k−1's
    output, so its inputs are carried over from unit k−1 (its float output, and the finished
    quantized unit applied to its quantized inputs) instead of rerunning the model's prefix."""
    stats, carry = [], None
    for k, unit in enumerate(units):
        want_next = bool(chain) and k + 1 < len(units) and chain[k + 1]
        done = _skipped(unit, stage) if not unit.per_sample else _resumed(ctx, unit, stage, k)
        if done is not None:  # nothing to optimise: the carried inputs are not needed
            stats.append(done)
            _release(ctx.pool, carry)
            carry = None
            continue
        seed = ctx.seed * 1_000_003 + 1009 * stage_idx + k
        gens = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
        with quant_state(ctx.model, weights=True, acts=stage.acts_on):
            st, carry = reconstruct_unit(ctx, unit, stage, gens,
                                         f"{stage.name} {k + 1}/{len(units)}", carry, want_next)
        ctx.work.save(stage.name, k, _state(ctx.model, unit, stage), st)
        stats.append(st)
    _release(ctx.pool, carry)
    return stats


def _skipped(unit: Unit, stage: Stage) -> dict:
    """See units: a unit without per-sample targets keeps nearest rounding."""
    return {"unit": unit.name, "kind": unit.kind, "layers": len(unit.layers),
            "stage": stage.name, "skipped": "input or output rows are not calibration samples "
            "(dim 0 folds other data)"}


def _resumed(ctx: Context, unit: Unit, stage: Stage, k: int) -> dict | None:
    """The stats of unit k restored from the work dir, or None if it has no saved state."""
    saved = ctx.work.load(stage.name, k)
    if saved is None:
        return None
    _restore(ctx.model, unit, stage, saved[0])
    return {**saved[1], "resumed": True}


def _release(pool: CachePool, tensors) -> None:
    for t in tensors or ():
        pool.release(t)


def _inputs(ctx: Context, mod: nn.Module, run, carry, pack=None
            ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """x_fp, y_fp, x_q of a unit (module ``mod``, run as ``run``: ``units.unit_fn``): from
    the carried inputs, or from runs of the model prefix."""
    model, pool = ctx.model, ctx.pool
    if carry is not None:
        x_fp, x_q = carry
        with quant_state(model, weights=False, acts=False):
            y_fp = unit_map(run, x_fp, pool, _chunk(ctx))
        return x_fp, y_fp, x_q, True
    with quant_state(model, weights=False, acts=False):
        x_fp, y_fp = collect(model, mod, ctx.batches, pool, want_output=True, pack=pack)
    x_q, _ = collect(model, mod, ctx.batches, pool, want_output=False, pack=pack)
    return x_fp, y_fp, x_q, False


def _chunk(ctx: Context) -> int:
    """Samples per unit call on cached inputs: one calibration batch, as in a model run."""
    return max(1, n_samples(ctx.batches[:1]))


def reconstruct_unit(ctx: Context, unit: Unit, stage: Stage,
                     gens: tuple[torch.Generator, torch.Generator], desc: str,
                     carry=None, want_next: bool = False) -> tuple[dict, Any]:
    """One unit (steps 1-4 of the module docstring). ``gens``: the generators of the batch
    draws / QDrop mix and of QDrop's drop. Returns the stats and, with ``want_next``, the next
    unit's carried inputs (this unit's float output, its quantized output on x_q)."""
    t0 = time.perf_counter()
    model, pool = ctx.model, ctx.pool
    mod, run = model.get_submodule(unit.name), unit_fn(model, unit)
    x_fp, y_fp, x_q, carried = _inputs(ctx, mod, run, carry, pack_args(unit))
    st: dict[str, Any] = {"unit": unit.name, "kind": unit.kind, "layers": len(unit.layers),
                          "stage": stage.name, "inputs": "carried" if carried else "collected"}
    y_next = None
    if want_next:  # the float output, before any term corrects the target
        y_next = pool.empty(tuple(y_fp.shape), y_fp.dtype)
        y_next.copy_(y_fp)
    for term in stage.terms:
        x_fp, y_fp, extra_st = term.correct(ctx, unit, x_fp, y_fp)
        st.update(extra_st)
    st["loss_before"] = eval_loss(run, x_q, y_fp, stage.rec_p)
    ws, acts = unit_quantizers(model, unit)
    rounds = ([stage.rounding(m.weight_quantizer, m.weight) for _, m in ws]
              if stage.learn_weights else [])
    for r in rounds:
        r.start(gens[0], stage.iters)
    steps = ([LSQ(q) for q in acts if not q.dynamic]  # a run-time range has no step to learn
             if stage.learn_acts and stage.acts_on else [])
    params_w, params_a = [r.v for r in rounds], [s.scale for s in steps]
    boundary = _boundary(run, acts, x_q[:2]) if stage.acts_on else []
    drop = QDrop(acts if stage.acts_on else [], boundary, stage.drop_prob, gens[1])
    extra = []
    for term in stage.terms:
        fn, extra_st = term.bind(ctx, mod, y_fp)
        st.update(extra_st)
        extra += [fn] if fn is not None else []
    t_opt = time.perf_counter()
    try:
        st["loss_train_last"] = _optimise(ctx, run, rounds, drop, params_w, params_a,
                                          x_q, x_fp, y_fp, stage, gens[0], desc, extra)
    finally:
        drop.remove()
        for s in steps:
            s.finish()
        for r in rounds:
            r.hard = True
    st["optimise_seconds"] = round(time.perf_counter() - t_opt, 2)
    st["loss_after"] = eval_loss(run, x_q, y_fp, stage.rec_p)
    nxt = None
    if want_next:
        nxt = (y_next, unit_map(run, x_q, pool, _chunk(ctx)))
    st["seconds"] = round(time.perf_counter() - t0, 2)
    for t in (x_fp, y_fp, x_q):
        pool.release(t)
    return st, nxt


def _optimise(ctx, mod, rounds: list[AdaRound], drop: "QDrop", params_w, params_a, x_q, x_fp,
              y_fp,
              stage: Stage, gen, desc, extra=()) -> float | None:
    if not params_w and not params_a:
        return None
    opt_w = torch.optim.Adam(params_w, lr=stage.lr_round) if params_w else None
    opt_a = torch.optim.Adam(params_a, lr=stage.lr_act) if params_a else None
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=stage.iters, eta_min=0.)
             if opt_a else None)
    bar = tqdm(range(stage.iters), desc=desc, disable=not ctx.progress, leave=False)
    loss = torch.zeros(())
    for t in bar:
        idx = torch.randint(len(x_q), (stage.batch_size,), generator=gen)
        xq, xf, y = x_q[idx], x_fp[idx], y_fp[idx]
        if stage.mix_prob > 0:
            x, mask = mix_inputs(xq, xf, stage.mix_prob, gen)
        else:
            x, mask = xq, torch.ones(xq.shape, dtype=torch.bool)
        if extra:  # the terms' losses read the unit output on the pure quantized input
            x, mask = torch.cat([x, xq]), torch.cat([mask, torch.ones_like(mask)])
        drop.mask = mask
        for r in rounds:
            r.at_step(t)
        out = mod(x)
        loss = rec_loss(out[:len(idx)], y, stage.rec_p)
        for fn in extra:
            loss = loss + fn(out[len(idx):], idx)
        beta = beta_at(t, stage.iters, stage.warmup, stage.b_range)
        if params_w and beta is not None:
            loss = loss + stage.round_weight * sum(r.regularizer(beta) for r in rounds)
        for o in (opt_w, opt_a):
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        for o in (opt_w, opt_a, sched):
            if o is not None:
                o.step()
        if t % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}")
    return float(loss.detach())


def _state(model: nn.Module, unit: Unit, stage: Stage) -> dict[str, Tensor]:
    out = {}
    for f in unit.layers:
        m = model.get_submodule(f)
        r = adaround_of(m.weight_quantizer)
        if r is not None:
            out[f + ".rounding"] = r.v.detach()
        if m.input_quantizer is not None:
            out[f + ".scale"] = m.input_quantizer.scale.detach().clone()  # may be shared
    return out


def _restore(model: nn.Module, unit: Unit, stage: Stage, tensors: dict[str, Tensor]) -> None:
    for f in unit.layers:
        m = model.get_submodule(f)
        if f + ".rounding" in tensors:
            stage.rounding(m.weight_quantizer, m.weight, v=tensors[f + ".rounding"], hard=True)
        if f + ".scale" in tensors:
            m.input_quantizer.scale = tensors[f + ".scale"].clone()


def commit(model: nn.Module) -> None:
    """Write hard-rounded weights back so ``freeze`` reproduces the AdaRound codes."""
    for _, m in quant_layers(model):
        r = adaround_of(m.weight_quantizer)
        if r is not None:
            m.weight.data = r.commit(m.weight)


def run_stages(model: nn.Module, mctx: MethodContext, stages: list[Stage], *, units_fn,
               cache_mb: int) -> dict[str, Any]:
    """Shared ``apply`` body: partition, run each stage over all units, commit the rounding."""
    for p in model.parameters():
        p.requires_grad_(False)
    meta = getattr(model, "_slimtorch_meta", {})
    work_dir, batches, seed = mctx.work_dir, mctx.batches, mctx.seed
    pool = CachePool(cache_mb << 20, Path(work_dir) / "spill" if work_dir else None)
    ctx = Context(model, batches, seed, pool,
                  WorkDir(work_dir, fingerprint(mctx.recipe.to_dict(), seed, batches, model)),
                  mctx.progress, mctx.float_model, [tuple(p) for p in meta.get("bn_folds", [])])
    try:
        units = units_fn(model, batches[0])
        for term in {id(t): t for s in stages for t in s.terms}.values():
            term.setup(ctx)
        t0 = time.perf_counter()
        per_unit = []
        chain = chained(model, units, batches[0])
        with torch.enable_grad():
            for i, stage in enumerate(stages):
                per_unit += reconstruct(ctx, units, stage, i, chain)
        commit(model)
        return {"units": [u.__dict__ for u in units], "per_unit": per_unit,
                "recon_seconds": round(time.perf_counter() - t0, 2),
                "spilled_mb": round(pool.spilled_bytes / 2**20, 1)}
    finally:
        pool.close()
