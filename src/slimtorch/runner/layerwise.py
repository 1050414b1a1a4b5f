"""Layer-wise solvers on the block-sequential runner: the lifecycle GPTQ (and SparseGPT, Wanda,
AWQ) share, written once.

Units are the reconstruction units (``units.partition``: residual blocks, module groups,
single layers). For each unit in graph order:
1. its inputs over the calibration set are cached (a bounded ``CachePool`` that spills to the
   work dir): when the unit is called on the previous unit's output itself (``units.chained``)
   they are the previous unit — already solved — applied to *its* cached inputs; otherwise one
   run of the model's prefix, stopped at the unit, collects them (a unit whose dim 0 is not
   the samples, ``Unit.per_sample``, is not cached: its layers are fed by prefix runs; nor is
   one whose inputs differ in shape between calibration items — padded sequences of different
   lengths);
2. ``make_solver(name, layer)`` builds a solver per quantized layer (a string instead says why
   the method leaves that layer alone: ``skipped``);
3. the unit runs on its cached inputs and every call of a layer hands its input, as the layer
   computes with it (after its input quantizer), to ``solver.add_batch``; with
   ``sequential="layer"`` (GPTQ's ``true_sequential``) one layer at a time, so a layer sees the
   outputs of the unit's layers solved before it; with ``"unit"`` all of them from one run;
   with ``"model"`` every layer of the model is fed by one pass of the model as it is before
   any layer is solved (no units; torchao's Wanda reads the dense model so);
4. ``solver.solve()`` writes the layer's decision into the model (quantized weights, a mask,
   scales) and returns its statistics as data; ``solver.free()`` drops its accumulators (a
   Hessian per layer is the large state) before the next layer.

Activation quantization is on while inputs are collected (as the recipe has it), so each layer
is solved for the inputs the quantized model really gives it. A model whose layers run more
than once per forward has no units; each layer is then fed by whole-model runs. Each solver
holds its own state; the core ``Quantizer`` only provides the grid (scale, zero point, integer
range) it rounds to.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.cache import CachePool
from ..methods import MethodContext
from ..quant.prepare import quant_state
from .recon_cache import VariableShapeError, _Stop, collect, n_samples, run_items, unit_map
from ..errors import SharedLayerError
from .units import Unit, chained, layer_order, pack_args, partition, unit_fn


class LayerSolver(Protocol):
    def add_batch(self, x: Tensor) -> None:
        """Accumulate statistics of one call's input (as the layer's weight multiplies it)."""

    def solve(self) -> dict[str, Any]:
        """Write the decision into the layer; return statistics (plain data)."""

    def free(self) -> None:
        """Drop the accumulated statistics."""


SolverFactory = Callable[[str, nn.Module], "LayerSolver | str"]


def make_units(model: nn.Module, example: Any) -> tuple[list[Unit], list[bool]]:
    """The reconstruction units and which of them read the previous unit's output
    (``units.chained``). A model whose layers run more than once per forward has no units:
    one per layer, each fed by a run of the whole model."""
    try:
        found = partition(model, example, blocks=True, max_group=3, edges_alone=False)
    except SharedLayerError:
        return [Unit(f, [f], "layer") for f in layer_order(model, example)[1]], []
    return found, chained(model, found, example)


@torch.no_grad()
def feed(model: nn.Module, solvers: dict[str, LayerSolver], batches: list, *,
         stop_early: bool = True) -> None:
    """Run the calibration items through the model; every call of a solver's layer feeds its
    (quantized) input. With ``stop_early`` each forward ends when the last layer has run."""
    def post(mod, args, out):
        raise _Stop

    hooks = _feeding(model, solvers)
    if stop_early:
        hooks.append(model.get_submodule(list(solvers)[-1]).register_forward_hook(post))
    try:
        for _ in run_items(model, batches):
            pass
    finally:
        for h in hooks:
            h.remove()


def _feeding(model: nn.Module, solvers: dict[str, LayerSolver]) -> list:
    def pre(name: str) -> Callable:
        def hook(mod, args):
            solvers[name].add_batch(mod.quantized_input(args[0]))
        return hook
    return [model.get_submodule(n).register_forward_pre_hook(pre(n)) for n in solvers]


@torch.no_grad()
def feed_unit(model: nn.Module, unit_mod: Callable[[Tensor], Any],
              solvers: dict[str, LayerSolver], xs: Tensor, chunk: int) -> None:
    """Run the unit on its cached inputs ``xs``, feeding its layers' solvers."""
    hooks = _feeding(model, solvers)
    try:
        for i in range(0, len(xs), chunk):
            unit_mod(xs[i:i + chunk])
    finally:
        for h in hooks:
            h.remove()


def _solvers(model: nn.Module, unit: Unit, make_solver: SolverFactory, skipped: dict
             ) -> dict[str, LayerSolver]:
    out = {}
    for f in unit.layers:
        made = make_solver(f, model.get_submodule(f))
        if isinstance(made, str):
            skipped[f] = made
        else:
            out[f] = made
    return out


def _solve_steps(solvers: dict[str, LayerSolver], sequential: str,
                 feed_part: Callable[[dict[str, LayerSolver]], None], per_layer: dict) -> None:
    """Feed and solve a unit's layers: one at a time (``sequential="layer"``, each fed after
    the ones before it are solved) or all from one feeding (``"unit"``)."""
    steps = [[f] for f in solvers] if sequential == "layer" else [list(solvers)]
    for step in steps if solvers else []:
        part = {f: solvers[f] for f in step}
        feed_part(part)
        _solve(part, per_layer)


def _solve(solvers: dict[str, LayerSolver], per_layer: dict) -> None:
    for f, solver in solvers.items():
        per_layer[f] = solver.solve()
        solver.free()


def solve_layers(model: nn.Module, mctx: MethodContext, make_solver: SolverFactory, *,
                 sequential: str = "layer", acts_on: bool = True, desc: str = "solve",
                 cache_mb: int = 2048) -> dict[str, Any]:
    """Run ``make_solver``'s solvers over the units of ``model`` (module docstring). A unit's
    inputs over the calibration set are cached (bounded pool, spill to ``work_dir``): the
    previous unit's outputs when it is chained to it, else a run of the model's prefix.
    Returns per-layer statistics, the layers skipped (with the reason) and the seconds."""
    t0 = time.perf_counter()
    batches = mctx.batches
    chunk = max(1, n_samples(batches[:1]))
    per_layer: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    spill = Path(mctx.work_dir) / "spill" if mctx.work_dir else None
    pool = CachePool(cache_mb << 20, spill)
    reruns = 0
    try:
        with quant_state(model, weights=True, acts=acts_on):
            if sequential == "model":  # one pass of the unsolved model feeds every layer
                unit = Unit("", layer_order(model, batches[0])[1], "model")
                solvers = _solvers(model, unit, make_solver, skipped)
                if solvers:
                    feed(model, solvers, batches, stop_early=False)
                    _solve(solvers, per_layer)
                return _stats(sequential, per_layer, skipped, t0, 1, 1, pool)
            units, chain = make_units(model, batches[0])
            if not chain:  # no units: each layer from a run of the whole model
                for unit in tqdm(units, desc=desc, disable=not mctx.progress, leave=False):
                    solvers = _solvers(model, unit, make_solver, skipped)
                    if solvers:
                        feed(model, solvers, batches, stop_early=False)
                        _solve(solvers, per_layer)
                return _stats(sequential, per_layer, skipped, t0, len(units), len(units), pool)
            xs = None
            for k, unit in enumerate(tqdm(units, desc=desc, disable=not mctx.progress,
                                          leave=False)):
                mod, fn = model.get_submodule(unit.name), unit_fn(model, unit)
                solvers = _solvers(model, unit, make_solver, skipped)
                if not unit.per_sample:  # nothing to cache: fed from runs of the model
                    _solve_steps(solvers, sequential,
                                 lambda part: feed(model, part, batches), per_layer)
                    reruns += 1
                    continue
                if xs is None:
                    reruns += 1
                    try:
                        xs, _ = collect(model, mod, batches, pool, want_output=False,
                                        pack=pack_args(unit))
                    except VariableShapeError:  # not cacheable: fed from runs of the model
                        _solve_steps(solvers, sequential,
                                     lambda part: feed(model, part, batches), per_layer)
                        continue
                _solve_steps(solvers, sequential,
                             lambda part: feed_unit(model, fn, part, xs, chunk), per_layer)
                nxt = (unit_map(fn, xs, pool, chunk)
                       if k + 1 < len(units) and chain[k + 1] else None)
                pool.release(xs)
                xs = nxt
    finally:
        pool.close()
    return _stats(sequential, per_layer, skipped, t0, len(units), reruns, pool)


def _stats(sequential, per_layer, skipped, t0, n_units, reruns, pool) -> dict[str, Any]:
    return {"sequential": sequential, "units": n_units, "prefix_runs": reruns,
            "layers": per_layer, "skipped": skipped,
            "spilled_mb": round(pool.spilled_bytes / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 2)}
