"""Block-sequential reconstruction, written once for AdaRound, BRECQ, QDrop and PD-Quant.

Units come from the QuantGraph (``partition``): the layers of a residual block form one unit
(run as the smallest module holding the block's layers and its add), stem and classifier are
their own units, the remaining layers are grouped by their module (≤ ``max_group`` layers).

For each unit, in graph order (``reconstruct``):
1. cache, for every calibration image, the unit's float input x_fp and float output (all
   quantizers off) and its input x_q in the current quantized model (earlier units done);
2. optionally correct x_fp's distribution (PD-Quant DC, ``pd.py``) and recompute the target;
3. optimise AdaRound V (``Quantizer.rounding``) and/or LSQ activation step sizes of the unit
   on ‖unit(x) − target‖² (+ λ·round regulariser, + PD loss), x = x_q or the QDrop mix;
4. harden the rounding, record the loss before/after on the whole cache, persist the state.

Cached tensors live in a ``CachePool`` (bounded RAM, spill to disk). Every random draw of a
unit comes from a generator seeded by (seed, stage, unit index), so a run resumed from its
work dir repeats the uninterrupted run bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from ..data.cache import CachePool
from ..errors import SlimtorchError
from ..graph.capture import call_model, capture, common_prefix
from ..quant.prepare import activation_quantizers, distinct, quant_layers
from ..quant.quantizer import Mode, Quantizer


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
    pd: Any = None               # PD-Quant settings (pdquant.PDSettings) or None


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


def pd_loss(z_q: Tensor, z_fp: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_fp/T) ‖ softmax(z_q/T)), 'batchmean', no T² factor (PD-Quant code)."""
    return nn.functional.kl_div(torch.log_softmax(z_q / temperature, 1),
                                torch.softmax(z_fp / temperature, 1), reduction="batchmean")


def mix_inputs(x_q: Tensor, x_fp: Tensor, prob: float, gen: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """QDrop: element-wise x_q with probability ``prob`` else x_fp. Returns (x, mask)."""
    mask = torch.rand(x_q.shape, generator=gen) < prob
    return torch.where(mask, x_q, x_fp), mask


# ============================================================== units
@dataclass
class Unit:
    name: str                    # module fqn run as the unit
    layers: list[str]            # quantized layers inside, graph order
    kind: str                    # "block" | "layer" | "group"


def _inside(fqn: str, mod: str) -> bool:
    return fqn == mod or fqn.startswith(mod + ".")


def partition(model: nn.Module, example: Any, *, blocks: bool = True, max_group: int = 3
              ) -> list[Unit]:
    """Reconstruction units of a prepared model, from its graph (see module docstring)."""
    with quant_state(model, weights=False, acts=False):
        graph = capture(model, example)
    qnames = {n for n, _ in quant_layers(model)}
    order = [l["fqn"] for l in graph.layers if l["fqn"] in qnames]
    pos = {f: i for i, f in enumerate(order)}
    edge = {order[0], order[-1]} if order else set()
    taken: dict[str, Unit] = {}
    units: list[Unit] = []

    def claim(mod: str, kind: str, allow_edge: bool) -> bool:
        inner = [f for f in order if _inside(f, mod)]
        idx = [pos[f] for f in inner]
        if (not mod or not inner or any(f in taken for f in inner)
                or idx != list(range(idx[0], idx[0] + len(idx)))
                or (not allow_edge and len(inner) > 1 and edge & set(inner))):
            return False
        units.append(Unit(mod, inner, kind))
        taken.update({f: units[-1] for f in inner})
        return True

    if blocks:
        for b in sorted(graph.blocks, key=lambda b: -len(b["layers"])):
            layers = [f for f in b["layers"] if f in qnames]
            if layers:
                claim(common_prefix([graph.nodes[b["add_node"]].module] + layers), "block", False)
    for f in order:
        if f in taken:
            continue
        parts = f.split(".")
        for k in range(1, len(parts)) if max_group > 1 else ():
            mod = ".".join(parts[:k])
            n = sum(_inside(g, mod) for g in order)
            if n <= max_group and claim(mod, "group", False):
                break
        if f not in taken:
            claim(f, "layer", True)
    units.sort(key=lambda u: pos[u.layers[0]])
    return _checked(model, units, example)


def _checked(model: nn.Module, units: list[Unit], example: Any) -> list[Unit]:
    """Keep a unit module only if it runs once per forward on one tensor; else split it."""
    calls: dict[str, list] = {u.name: [] for u in units}
    hooks = [model.get_submodule(u.name).register_forward_pre_hook(
        lambda m, a, kw, n=u.name: calls[n].append((a, kw)), with_kwargs=True) for u in units]
    try:
        with torch.no_grad(), quant_state(model, weights=False, acts=False):
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for u in units:
        c = calls[u.name]
        if len(c) == 1 and len(c[0][0]) == 1 and not c[0][1] and isinstance(c[0][0][0], Tensor):
            out.append(u)
        elif u.kind != "layer":
            out += [Unit(f, [f], "layer") for f in u.layers]
        else:
            raise ValueError(f"layer {u.name!r} runs {len(c)} times per forward; "
                             "reconstruction needs each layer to run once")
    return out


# ============================================================== model-wide switches
def _all_quantizers(model: nn.Module) -> tuple[list[Quantizer], list[Quantizer]]:
    ws = [m.weight_quantizer for _, m in quant_layers(model)
          if m.weight_quantizer is not None and not m.frozen]
    return ws, activation_quantizers(model)


@contextmanager
def quant_state(model: nn.Module, *, weights: bool, acts: bool):
    """Temporarily switch weight / activation fake-quantization on or off model-wide."""
    ws, acts_q = _all_quantizers(model)
    saved = [(q, q.mode) for q in ws + acts_q]
    for q in ws:
        q.mode = Mode.QUANT if weights else Mode.OFF
    for q in acts_q:
        q.mode = Mode.QUANT if acts else Mode.OFF
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


# ============================================================== data plumbing
class _Stop(Exception):
    pass


def cat_items(batches: list) -> Any:
    """All calibration items concatenated along dim 0 (same structure as one item)."""
    return tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0],
                    batches[0], *batches[1:])


def take(items: Any, idx: Tensor) -> Any:
    return tree_map(lambda x: x[idx] if isinstance(x, Tensor) else x, items)


def n_samples(batches: list) -> int:
    return sum(tree_flatten(b)[0][0].shape[0] for b in batches)


@torch.no_grad()
def collect(model: nn.Module, module: nn.Module, batches: list, pool: CachePool,
            want_output: bool) -> tuple[Tensor, Tensor | None]:
    """Cache ``module``'s input (and output) for every calibration sample; stops each forward
    as soon as it has what it needs."""
    got: dict[str, Tensor] = {}

    def pre(m, args):
        got["x"] = args[0]
        if not want_output:
            raise _Stop

    def post(m, args, out):
        got["y"] = out
        raise _Stop

    hooks = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    n, row, xs, ys = n_samples(batches), 0, None, None
    try:
        for item in batches:
            try:
                call_model(model, item)
            except _Stop:
                pass
            x = got["x"]
            if xs is None:
                xs = pool.empty((n, *x.shape[1:]))
                ys = pool.empty((n, *got["y"].shape[1:])) if want_output else None
            xs[row:row + len(x)] = x
            if want_output:
                ys[row:row + len(x)] = got["y"]
            row += len(x)
    finally:
        for h in hooks:
            h.remove()
    return xs, ys


@torch.no_grad()
def model_outputs(model: nn.Module, batches: list, pool: CachePool) -> Tensor:
    outs = [call_model(model, b) for b in batches]
    if not all(isinstance(o, Tensor) for o in outs):
        raise ValueError("PD-Quant needs a model that returns a logits tensor")
    z = pool.empty((sum(len(o) for o in outs), *outs[0].shape[1:]))
    torch.cat(outs, out=z)
    return z


@torch.no_grad()
def unit_map(fn: Callable[[Tensor], Tensor], xs: Tensor, pool: CachePool, chunk: int = 256
             ) -> Tensor:
    first = fn(xs[:chunk])
    out = pool.empty((len(xs), *first.shape[1:]))
    out[:len(first)] = first
    for i in range(chunk, len(xs), chunk):
        out[i:i + chunk] = fn(xs[i:i + chunk])
    return out


@torch.no_grad()
def eval_loss(unit: nn.Module, xs: Tensor, ys: Tensor, p: float, chunk: int = 256) -> float:
    tot = 0.0
    for i in range(0, len(xs), chunk):
        tot += rec_loss(unit(xs[i:i + chunk]), ys[i:i + chunk], p).item() * len(xs[i:i + chunk])
    return tot / len(xs)


# ============================================================== run state (resume)
class WorkDir:
    """Per-unit state files: ``<stage>-<k>.safetensors`` (V and step sizes of the unit)."""

    def __init__(self, path: str | Path | None, fingerprint: str):
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fp_file = self.path / "fingerprint.json"
        if fp_file.is_file() and json.loads(fp_file.read_text()) != fingerprint:
            if any(self.path.glob("*.safetensors")):
                raise SlimtorchError(
                    f"{self.path} holds unit state of a different run (recipe, seed, data or "
                    "model differ); delete it or use another work_dir")
        fp_file.write_text(json.dumps(fingerprint))

    def _file(self, stage: str, k: int) -> Path | None:
        return None if self.path is None else self.path / f"{stage}-{k}.safetensors"

    def load(self, stage: str, k: int) -> tuple[dict[str, Tensor], dict] | None:
        f = self._file(stage, k)
        if f is None or not f.is_file():
            return None
        return load_file(f), json.loads((f.with_suffix(".json")).read_text())

    def save(self, stage: str, k: int, tensors: dict[str, Tensor], stats: dict) -> None:
        f = self._file(stage, k)
        if f is not None:
            f.with_suffix(".json").write_text(json.dumps(stats))
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(f))


def fingerprint(recipe_dict: dict, seed: int, batches: list, model: nn.Module) -> str:
    """Hash of what determines the result: recipe, seed, data, calibrated model state."""
    h = hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode())
    h.update(str(seed).encode())
    for t in tree_flatten(batches)[0] + list(model.state_dict().values()):
        if isinstance(t, Tensor):
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    inputs: Any = None           # all calibration items concatenated
    logits_fp: Tensor | None = None


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


def reconstruct(ctx: Context, units: list[Unit], stage: Stage, stage_idx: int = 0
                ) -> list[dict]:
    stats = []
    for k, unit in enumerate(units):
        saved = ctx.work.load(stage.name, k)
        if saved is not None:
            _restore(ctx.model, unit, stage, saved[0])
            stats.append({**saved[1], "resumed": True})
            continue
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 1009 * stage_idx + k)
        with torch.random.fork_rng(devices=[]), quant_state(ctx.model, weights=True,
                                                            acts=stage.acts_on):
            torch.manual_seed(ctx.seed * 1_000_003 + 1009 * stage_idx + k)
            st = reconstruct_unit(ctx, unit, stage, gen, f"{stage.name} {k + 1}/{len(units)}")
        ctx.work.save(stage.name, k, _state(ctx.model, unit, stage), st)
        stats.append(st)
    return stats


def reconstruct_unit(ctx: Context, unit: Unit, stage: Stage, gen: torch.Generator,
                     desc: str) -> dict:
    t0 = time.perf_counter()
    model, pool = ctx.model, ctx.pool
    mod = model.get_submodule(unit.name)
    with quant_state(model, weights=False, acts=False):
        x_fp, y_fp = collect(model, mod, ctx.batches, pool, want_output=True)
    x_q, _ = collect(model, mod, ctx.batches, pool, want_output=False)
    st: dict[str, Any] = {"unit": unit.name, "kind": unit.kind, "layers": len(unit.layers),
                          "stage": stage.name}
    if stage.pd is not None and stage.pd.dc_steps > 0:
        from .pd import correct_unit_inputs
        t_dc = time.perf_counter()
        x_fp, y_fp, st["dc"] = correct_unit_inputs(ctx, unit, x_fp, y_fp, stage.pd)
        st["dc"]["seconds"] = round(time.perf_counter() - t_dc, 2)
    st["loss_before"] = eval_loss(mod, x_q, y_fp, stage.rec_p)
    ws, acts = unit_quantizers(model, unit)
    params_w, params_a = [], []
    if stage.learn_weights:
        for f, m in ws:
            m.weight_quantizer.init_rounding(m.weight)
            params_w.append(m.weight_quantizer.rounding)
    if stage.learn_acts and stage.acts_on:
        params_a = [q.enable_lsq() for q in acts]
    boundary = _boundary(mod, acts, x_q[:2]) if stage.acts_on else []
    for q in acts:
        q.drop_prob = stage.drop_prob if stage.acts_on else 0.0
    extra = None
    if stage.pd is not None:
        extra, st["suffix"] = _pd_term(ctx, mod, y_fp, stage)
    t_opt = time.perf_counter()
    try:
        st["loss_train_last"] = _optimise(ctx, mod, ws, acts, boundary, params_w, params_a,
                                          x_q, x_fp, y_fp, stage, gen, desc, extra)
    finally:
        for q in acts:
            q.drop_prob, q.drop_mask = 0.0, None
            q.disable_lsq()
        for _, m in ws:
            if m.weight_quantizer.rounding is not None:
                m.weight_quantizer.hard_rounding = True
    st["optimise_seconds"] = round(time.perf_counter() - t_opt, 2)
    st["loss_after"] = eval_loss(mod, x_q, y_fp, stage.rec_p)
    st["seconds"] = round(time.perf_counter() - t0, 2)
    for t in (x_fp, y_fp, x_q):
        pool.release(t)
    return st


def _pd_term(ctx: Context, mod: nn.Module, y_fp: Tensor, stage: Stage):
    """PD-Quant's prediction loss on (unit output, sample indices), and how the suffix runs."""
    from .pd import prediction_loss
    from .suffix import SuffixRunner
    first = torch.arange(min(stage.batch_size, len(y_fp)))
    if len(first) < stage.batch_size:
        raise ValueError(f"PD-Quant needs at least batch_size={stage.batch_size} calibration "
                         f"samples, got {len(first)}")
    runner = SuffixRunner(ctx.model, mod, take(ctx.inputs, first), y_fp[first])
    return (lambda out_q, idx: prediction_loss(runner, ctx, out_q, idx, stage.pd)), runner.mode


def _optimise(ctx, mod, ws, acts, boundary, params_w, params_a, x_q, x_fp, y_fp,
              stage: Stage, gen, desc, extra=None) -> float | None:
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
        if stage.pd is not None:
            x, mask = torch.cat([x, xq]), torch.cat([mask, torch.ones_like(mask)])
        for q in boundary:
            q.drop_mask = mask
        out = mod(x)
        loss = rec_loss(out[:len(idx)], y, stage.rec_p)
        if extra is not None:
            loss = loss + extra(out[len(idx):], idx)
        beta = beta_at(t, stage.iters, stage.warmup, stage.b_range)
        if params_w and beta is not None:
            loss = loss + stage.round_weight * sum(
                m.weight_quantizer.round_regularizer(beta) for _, m in ws)
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
        if m.weight_quantizer is not None and m.weight_quantizer.rounding is not None:
            out[f + ".rounding"] = m.weight_quantizer.rounding.detach()
        if m.input_quantizer is not None:
            out[f + ".scale"] = m.input_quantizer.scale.detach().clone()  # may be shared
    return out


def _restore(model: nn.Module, unit: Unit, stage: Stage, tensors: dict[str, Tensor]) -> None:
    for f in unit.layers:
        m = model.get_submodule(f)
        if f + ".rounding" in tensors:
            m.weight_quantizer.rounding = nn.Parameter(tensors[f + ".rounding"])
            m.weight_quantizer.hard_rounding = True
        if f + ".scale" in tensors:
            m.input_quantizer.scale = tensors[f + ".scale"].clone()


def commit(model: nn.Module) -> None:
    """Write hard-rounded weights back so ``freeze`` reproduces the AdaRound codes."""
    for _, m in quant_layers(model):
        wq = m.weight_quantizer
        if wq is not None and wq.rounding is not None:
            m.weight.data = wq.commit_rounding(m.weight)


def run_stages(model: nn.Module, recipe, batches: list, stages: list[Stage], *, seed: int,
               progress: bool, float_model: nn.Module | None, work_dir, units_fn,
               cache_mb: int, need_logits: bool = False) -> dict[str, Any]:
    """Shared ``apply`` body: partition, run each stage over all units, commit the rounding."""
    for p in model.parameters():
        p.requires_grad_(False)
    meta = getattr(model, "_slimtorch_meta", {})
    pool = CachePool(cache_mb << 20, Path(work_dir) / "spill" if work_dir else None)
    ctx = Context(model, batches, seed, pool,
                  WorkDir(work_dir, fingerprint(recipe.to_dict(), seed, batches, model)),
                  progress, float_model, [tuple(p) for p in meta.get("bn_folds", [])])
    try:
        units = units_fn(model, batches[0])
        if need_logits:
            ctx.inputs = cat_items(batches)
            with torch.no_grad(), quant_state(model, weights=False, acts=False):
                ctx.logits_fp = model_outputs(model, batches, pool)
        t0 = time.perf_counter()
        per_unit = []
        with torch.enable_grad():
            for i, stage in enumerate(stages):
                per_unit += reconstruct(ctx, units, stage, i)
        commit(model)
        return {"units": [u.__dict__ for u in units], "per_unit": per_unit,
                "recon_seconds": round(time.perf_counter() - t0, 2),
                "spilled_mb": round(pool.spilled_bytes / 2**20, 1)}
    finally:
        pool.close()
