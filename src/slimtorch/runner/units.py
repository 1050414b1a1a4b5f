"""Reconstruction units of a prepared model, from its QuantGraph.

The layers of a residual block form one unit (run as the smallest module holding the block's
layers and its add); stem and classifier are their own units; the remaining layers are grouped
by their module (at most ``max_group`` layers). A unit module must run once per forward on one
tensor, else it is split into its layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..graph.capture import call_model, capture, common_prefix
from ..quant.prepare import quant_layers, quant_state


@dataclass
class Unit:
    name: str                    # module fqn run as the unit
    layers: list[str]            # quantized layers inside, graph order
    kind: str                    # "block" | "layer" | "group"


def _inside(fqn: str, mod: str) -> bool:
    return fqn == mod or fqn.startswith(mod + ".")


def layer_order(model: nn.Module, example: Any) -> tuple[Any, list[str]]:
    """The captured graph of a prepared model (quantizers off) and its quantized layers in
    graph order (each once, at its first call)."""
    with quant_state(model, weights=False, acts=False):
        graph = capture(model, example)
    qnames = {n for n, _ in quant_layers(model)}
    order = list(dict.fromkeys(l["fqn"] for l in graph.layers if l["fqn"] in qnames))
    return graph, order


def partition(model: nn.Module, example: Any, *, blocks: bool = True, max_group: int = 3
              ) -> list[Unit]:
    """Reconstruction units of a prepared model, from its graph (see module docstring)."""
    graph, order = layer_order(model, example)
    qnames = set(order)
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
    """Keep a unit module only if it runs once per forward on one tensor; else split it."""
    calls: dict[str, list] = {u.name: [] for u in units}
    probe(model, example, [model.get_submodule(u.name).register_forward_pre_hook(
        lambda m, a, kw, n=u.name: calls[n].append((a, kw)), with_kwargs=True) for u in units])
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


def chained(model: nn.Module, units: list[Unit], example: Any) -> list[bool]:
    """``chained[k]``: unit k is called on unit k−1's output tensor itself (nothing runs in
    between), so its inputs over the calibration set are unit k−1 applied to its cached inputs
    — no rerun of the model's prefix."""
    ins: dict[str, Any] = {}
    outs: dict[str, Any] = {}
    hooks = []
    for u in units:
        mod = model.get_submodule(u.name)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, n=u.name: ins.setdefault(n, a[0] if a else None)))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, n=u.name: outs.setdefault(n, o)))
    probe(model, example, hooks)
    return [k > 0 and ins.get(u.name) is not None and ins.get(u.name) is outs.get(units[k - 1].name)
            for k, u in enumerate(units)]
