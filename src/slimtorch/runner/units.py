"""Reconstruction units of a prepared model, from its QuantGraph.

The layers of a residual block form one unit (run as the smallest module holding the block's
layers and its add); stem and classifier are their own units; the remaining layers are grouped
by their module (at most ``max_group`` layers). A unit module must run once per forward on one
tensor, else it is split into its layers.

A unit's inputs and outputs are cached one row per calibration sample, so its input and output
must have the samples on dim 0. A unit module may take more arguments than that input when they
are the same for every sample: a Hugging Face decoder layer's rotary tables, causal mask and
flags (``Unit.extras``, recorded on the probe and passed again on every run of the unit:
``unit_fn``). They may hold tensors without a sample dim and plain values, nothing stateful (a
KV cache object) -- else the unit is split as below. Assumption: such shared arguments depend
on the input's shape only (positions, causal masks), as they do in transformers' models.

A block or group that folds something else into dim 0 (MobileViT's unfold of patches into the
batch, a position index with no batch dim) is split into its layers; such a layer is kept with
``per_sample=False``: the runners do not cache or carry its inputs (the layer-wise runner feeds
it from runs of the whole model; reconstruction, whose targets are per-sample, leaves it at
nearest rounding and says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import SharedLayerError
from ..graph.capture import call_model, common_prefix, graph_of
from ..quant.prepare import quant_layers, quant_state
from .recon_cache import n_samples


@dataclass
class Unit:
    name: str                    # module fqn run as the unit
    layers: list[str]            # quantized layers inside, graph order
    kind: str                    # "block" | "layer" | "group"
    per_sample: bool = True      # input and output have one row per calibration sample
    extras: tuple | None = None  # (args after the input, kwargs) shared by all samples
    # per-sample tensor arguments besides the input (a UNet block's time embedding): each
    # (where, shape[1:]), where = ("arg", i) | ("kw", name); cached packed with the input
    packed: tuple | None = None
    input_shape: tuple | None = None  # the input's shape[1:] when packed


def pack_args(unit: Unit) -> Callable[[tuple, dict], Tensor] | None:
    """(args, kwargs) of a call of ``unit`` -> one [B, D] tensor: the input and each
    per-sample argument flattened and concatenated (None: the unit takes its input alone)."""
    if not unit.packed:
        return None

    def pack(args: tuple, kwargs: dict) -> Tensor:
        parts = [args[0]] + [args[w[1]] if w[0] == "arg" else kwargs[w[1]]
                             for w, _ in unit.packed]
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1)  # [B, D]
    return pack


def unit_fn(model: nn.Module, unit: Unit) -> Callable[[Tensor], Any]:
    """The unit as a function of its (cached) input: its module, with its shared extra
    arguments."""
    mod = model.get_submodule(unit.name)
    if not unit.extras and not unit.packed:
        return mod
    args, kwargs = unit.extras or ((), {})
    if not unit.packed:
        return lambda x: mod(x, *args, **kwargs)
    shapes = [tuple(unit.input_shape)] + [tuple(sh) for _, sh in unit.packed]
    sizes = [int(torch.Size(sh).numel()) for sh in shapes]

    def run(p: Tensor) -> Any:  # p [B, D]: the input and the per-sample arguments
        parts = [c.reshape(c.shape[0], *sh) for c, sh in zip(p.split(sizes, 1), shapes)]
        a, kw = list(args), dict(kwargs)
        for (where, _), v in zip(unit.packed, parts[1:]):
            if where[0] == "arg":
                a[where[1] - 1] = v
            else:
                kw[where[1]] = v
        return mod(parts[0], *a, **kw)
    return run


def _inside(fqn: str, mod: str) -> bool:
    return fqn == mod or fqn.startswith(mod + ".")


def layer_order(model: nn.Module, example: Any) -> tuple[Any, list[str]]:
    """The graph of a prepared model (``graph_of``: the one ``prepare`` captured; quantizers
    off should it need a capture) and its quantized layers in graph order (each once, at its
    first call)."""
    with quant_state(model, weights=False, acts=False):
        graph = graph_of(model, example)
    qnames = {n for n, _ in quant_layers(model)}
    order = list(dict.fromkeys(l["fqn"] for l in graph.layers if l["fqn"] in qnames))
    return graph, order


def partition(model: nn.Module, example: Any, *, blocks: bool = True, max_group: int = 3,
              edges_alone: bool = True) -> list[Unit]:
    """Reconstruction units of a prepared model, from its graph (see module docstring).
    ``edges_alone``: the first and last quantized layers are units of their own (the
    reconstruction protocol); the layer-wise runner, which solves layer by layer anyway,
    lets them be part of a block (one cached input instead of a model run per layer)."""
    graph, order = layer_order(model, example)
    qnames = set(order)
    pos = {f: i for i, f in enumerate(order)}
    edge = {order[0], order[-1]} if order and edges_alone else set()
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


def probe(model: nn.Module, example: Any, hooks: list) -> None:
    """One forward of ``example`` with all quantizers off, for the ``hooks`` (already
    registered) to observe; they are removed afterwards."""
    try:
        with torch.no_grad(), quant_state(model, weights=False, acts=False):
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()


def _checked(model: nn.Module, units: list[Unit], example: Any) -> list[Unit]:
    """Keep a unit module only if it runs once per forward on one tensor with the samples on
    dim 0 in and out; else split it into its layers (module docstring)."""
    calls: dict[str, list] = {u.name: [] for u in units}
    outs: dict[str, list] = {u.name: [] for u in units}
    hooks = []
    for u in units:
        mod = model.get_submodule(u.name)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, kw, n=u.name: calls[n].append((a, kw)), with_kwargs=True))
        hooks.append(mod.register_forward_hook(lambda m, a, o, n=u.name: outs[n].append(o)))
    probe(model, example, hooks)
    n = n_samples([example])
    out = []
    for u in units:
        c = calls[u.name]
        once = len(c) == 1 and len(c[0][0]) >= 1 and isinstance(c[0][0][0], Tensor)
        extras = (tuple(c[0][0][1:]), dict(c[0][1])) if once else None
        rows = once and _rows(c[0][0][0], n) and _rows(outs[u.name][0], n)
        packed = _per_sample(extras, n) if rows and not _shared(extras, n) else None
        if rows and _shared(extras, n):
            out.append(Unit(u.name, u.layers, u.kind,
                            extras=extras if extras[0] or extras[1] else None))
        elif packed and u.kind != "layer":
            out.append(Unit(u.name, u.layers, u.kind, extras=packed[0], packed=packed[1],
                            input_shape=tuple(c[0][0][0].shape[1:])))
        elif u.kind != "layer":
            out += _checked(model, [Unit(f, [f], "layer") for f in u.layers], example)
        elif once:
            out.append(Unit(u.name, u.layers, u.kind, per_sample=False))
        else:
            raise SharedLayerError(
                f"layer {u.name!r} runs {len(c)} times per forward (a shared or tied layer); "
                "block reconstruction needs each layer to run once: untie the layer (one module "
                "per use) or use a layer-wise method such as gptq, which feeds every call")
    return out


def _rows(t: Any, n: int) -> bool:
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n


_PLAIN = (type(None), bool, int, float, str)


def _shared(extras: tuple, n: int) -> bool:
    """Extra arguments a unit can be re-run with on any samples: tensors without a sample dim
    (with one sample: tensors without any dim) and plain values; no stateful object."""
    for x in tree_flatten(extras)[0]:
        if isinstance(x, Tensor):
            if (x.dim() > 0 and n == 1) or _rows(x, n) or x.requires_grad:
                return False
        elif not isinstance(x, _PLAIN):
            return False
    return True


def _per_sample(extras: tuple, n: int) -> tuple | None:
    """(the shared extras with None where a per-sample float tensor was, the per-sample
    ones' (where, shape[1:])) when every extra argument is shared or such a tensor."""
    args, kwargs = extras
    where = [(("arg", i + 1), a) for i, a in enumerate(args)] + \
        [(("kw", k), v) for k, v in kwargs.items()]
    rows = [(w, v) for w, v in where if isinstance(v, Tensor) and _rows(v, n)]
    if any(not v.is_floating_point() or v.requires_grad for _, v in rows) or n == 1:
        return None
    shared_args = tuple(None if _rows(a, n) and isinstance(a, Tensor) else a for a in args)
    shared_kw = {k: v for k, v in kwargs.items() if not (isinstance(v, Tensor) and _rows(v, n))}
    if not _shared((shared_args, shared_kw), n):
        return None
    return (shared_args, shared_kw), tuple((w, tuple(v.shape[1:])) for w, v in rows)


def chained(model: nn.Module, units: list[Unit], example: Any) -> list[bool]:
    """``chained[k]``: unit k is called on unit k−1's output tensor itself (nothing runs in
    between), so its inputs over the calibration set are unit k−1 applied to its cached inputs
    — no rerun of the model's prefix."""
    ins: dict[str, Any] = {}
    outs: dict[str, Any] = {}
    hooks = []
    def keep(store: dict, name: str, value: Any) -> None:  # a hook returning a value
        store.setdefault(name, value)                       # would replace args / output
    for u in units:
        mod = model.get_submodule(u.name)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, n=u.name: keep(ins, n, a[0] if a else None)))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, n=u.name: keep(outs, n, o)))
    probe(model, example, hooks)
    return [k > 0 and u.per_sample and units[k - 1].per_sample and not u.packed
            and ins.get(u.name) is not None
            and ins.get(u.name) is outs.get(units[k - 1].name) for k, u in enumerate(units)]
