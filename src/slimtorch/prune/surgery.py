"""Physical pruning: the kept indices of every entry → smaller Conv/Linear/BatchNorm modules,
the replayable history, the masked float reference, and MACs/params counting.

The history is plain data, ``{"modules": {fqn: {"out"|"in"|"norm": kept indices}}}`` (plus
which group and units were removed, for the record): ``replay`` applies it to a freshly built
base model without a graph or an example input (``slimtorch.load``).

Modules are shrunk in place (their parameters replaced by the kept slices and their size
attributes set), which keeps the module's class — a timm ``Conv2dSame`` stays one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SlimtorchError
from ..graph.capture import QuantGraph
from .groups import Groups


def kept_indices(groups: Groups, pruned: set[int]) -> dict[str, dict[str, list[int]]]:
    """{fqn: {role: kept positions}} after removing the units ``pruned`` (only entries that
    lose something are listed)."""
    drop: dict[tuple[str, str], list[Tensor]] = {}
    for uid in pruned:
        for fqn, role, pos in groups.units[uid].where:
            drop.setdefault((fqn, role), []).append(pos)
    out: dict[str, dict[str, list[int]]] = {}
    for (fqn, role), pos in sorted(drop.items()):
        keep = torch.ones(groups.sizes[(fqn, role)], dtype=torch.bool)
        keep[torch.cat(pos)] = False
        out.setdefault(fqn, {})[role] = keep.nonzero().flatten().tolist()
    return out


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=t.requires_grad)


@torch.no_grad()
def shrink(model: nn.Module, modules: dict[str, dict[str, list[int]]]) -> None:
    """Replace the parameters of every listed module by their kept slices."""
    named = dict(model.named_modules())
    for fqn, roles in modules.items():
        mod = named.get(fqn)
        if mod is None:
            raise SlimtorchError(f"the pruning history names module {fqn!r}, which the model "
                                 "does not have: replay it on the model it was made from")
        for role, keep in roles.items():
            _shrink_one(mod, fqn, role, torch.tensor(keep, dtype=torch.long))


def _shrink_one(mod: nn.Module, fqn: str, role: str, keep: Tensor) -> None:
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and role == "norm":
        for name in ("weight", "bias"):
            if getattr(mod, name) is not None:
                setattr(mod, name, _param(getattr(mod, name)[keep]))
        for name in ("running_mean", "running_var"):
            if getattr(mod, name) is not None:
                setattr(mod, name, getattr(mod, name)[keep].clone())
        mod.num_features = len(keep)
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) and role in ("out", "in"):
        depthwise = getattr(mod, "groups", 1) > 1
        if role == "out" or depthwise:
            mod.weight = _param(mod.weight[keep])
            if mod.bias is not None:
                mod.bias = _param(mod.bias[keep])
        else:
            mod.weight = _param(mod.weight[:, keep])
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape[0], mod.weight.shape[1]
        else:
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * (len(keep) if depthwise else 1)
            if depthwise:
                mod.groups = len(keep)
    else:
        raise SlimtorchError(f"cannot prune {role} channels of {fqn} ({type(mod).__name__})")


def replay(model: nn.Module, history: dict[str, Any]) -> nn.Module:
    """Apply a pruning history (``prune_model``'s channel removals, ``lowrank``'s
    factorisations) to ``model`` in place, in order; returns it."""
    for step in history.get("steps", []):
        if "modules" in step:
            shrink(model, step["modules"])
        if "lowrank" in step:
            factorise(model, step["lowrank"], init=False)
    return model


def unit_positions(groups: Groups, units) -> dict[tuple[str, str], Tensor]:
    """{(fqn, role): positions} of the ``units``' producer rows ("out") and BatchNorm
    entries ("norm"): what zeroing them touches."""
    at: dict[tuple[str, str], list[Tensor]] = {}
    for uid in units:
        for fqn, role, pos in groups.units[uid].where:
            if role in ("out", "norm"):
                at.setdefault((fqn, role), []).append(pos)
    return {k: torch.cat(v) for k, v in at.items()}


@torch.no_grad()
def scale_units(model: nn.Module, at: dict[tuple[str, str], Tensor], factor: float) -> None:
    """Multiply the producer rows, biases and BatchNorm affine at ``at`` by ``factor``."""
    named = dict(model.named_modules())
    for (fqn, _), pos in at.items():
        mod = named[fqn]
        for t in (mod.weight, mod.bias):
            if t is not None:
                t[pos] *= factor


def mask_model(model: nn.Module, groups: Groups, pruned: set[int]) -> nn.Module:
    """The masked float reference: the removed channels' producer rows, biases and BN
    affine set to zero, so they contribute exactly 0 to every consumer (in place)."""
    scale_units(model, unit_positions(groups, pruned), 0.0)
    return model


# ------------------------------------------------------------------ low-rank factorisation
# (the ``lowrank`` method's layers, here so that ``replay`` rebuilds them)
def weight_matrix(mod: nn.Module) -> Tensor:
    return mod.weight.detach().reshape(mod.weight.shape[0], -1).double()


def matrix_dims(mod: nn.Module) -> tuple[int, int]:
    """(out, in·k·k) of the weight matrix."""
    w = mod.weight
    return w.shape[0], w[0].numel()


def factors(mod: nn.Module, rank: int) -> tuple[Tensor, Tensor]:
    """(first [r, in·k·k], second [out, r]) with second @ first the rank-r truncation."""
    u, s, vh = torch.linalg.svd(weight_matrix(mod), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def factorised(mod: nn.Module, rank: int, init: bool = True) -> nn.Sequential:
    """The two-layer replacement of ``mod`` (weights from the SVD when ``init``)."""
    if isinstance(mod, nn.Linear):
        first = nn.Linear(mod.in_features, rank, bias=False)
        second = nn.Linear(rank, mod.out_features, bias=mod.bias is not None)
    else:
        first = nn.Conv2d(mod.in_channels, rank, mod.kernel_size, mod.stride, mod.padding,
                          mod.dilation, bias=False, padding_mode=mod.padding_mode)
        second = nn.Conv2d(rank, mod.out_channels, 1, bias=mod.bias is not None)
    seq = nn.Sequential(first, second).to(mod.weight.dtype)
    if init:
        a, b = factors(mod, rank)
        with torch.no_grad():
            first.weight.copy_(a.reshape(first.weight.shape))
            second.weight.copy_(b.reshape(second.weight.shape))
            if mod.bias is not None:
                second.bias.copy_(mod.bias)
    return seq


def _set(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def factorise(model: nn.Module, ranks: dict[str, int], init: bool = True) -> nn.Module:
    """Replace every ``{fqn: rank}`` layer by its factorisation, in place (``init=False``:
    shapes only, for ``replay`` before the artifact's tensors are loaded)."""
    named = dict(model.named_modules())
    for fqn, rank in ranks.items():
        mod = named.get(fqn)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise SlimtorchError(f"the low-rank history names {fqn!r}, which is not a Conv2d/"
                               "Linear of this model: replay it on the model it was made from")
        _set(model, fqn, factorised(mod, rank, init))
    return model


# ------------------------------------------------------------------ cost
def layer_costs(model: nn.Module, graph: QuantGraph) -> dict[str, dict[str, float]]:
    """{fqn: {macs, params, in, out}} of every Conv/Linear the graph ran (MACs per sample:
    output elements × inputs per output; a module called twice counts twice)."""
    named = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for layer in graph.layers:
        mod = named[layer["fqn"]]
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        shape = graph.nodes[layer["node"]].shape
        per_out = mod.weight[0].numel()  # inputs per output element (in/groups · k·k)
        macs = math.prod(shape[1:]) * per_out if len(shape) > 1 else shape[0] * per_out
        c = out.setdefault(layer["fqn"], {"macs": 0.0, "params": float(mod.weight.numel()),
                                          "out": float(mod.weight.shape[0]),
                                          "in": float(mod.weight.shape[1])})
        c["macs"] += macs
    return out


def removed_counts(groups: Groups, units, into: dict | None = None
                   ) -> dict[tuple[str, str], int]:
    """{(fqn, role): positions removed} when ``units`` go (added to ``into``'s counts)."""
    out = dict(into or {})
    for u in units:
        for fqn, role, pos in groups.units[u].where:
            out[(fqn, role)] = out.get((fqn, role), 0) + len(pos)
    return out


def cost_after(costs: dict[str, dict[str, float]], groups: Groups,
               removed: dict[tuple[str, str], int], total_params: int) -> tuple[float, float]:
    """(MACs, params) of the Conv/Linear layers after ``removed[(fqn, role)]`` positions go
    (depthwise layers shrink on both sides with their out entry); other parameters are
    counted as they are, BatchNorm entries at 2 parameters per channel."""
    macs, params = 0.0, float(total_params)
    for fqn, c in costs.items():
        o = removed.get((fqn, "out"), 0) / c["out"]
        i = removed.get((fqn, "in"), 0) / groups.sizes.get((fqn, "in"), c["in"] or 1)
        if (fqn, "in") not in groups.sizes:
            i = 0.0
        frac = (1 - o) * (1 - i)
        macs += c["macs"] * frac
        params -= c["params"] * (1 - frac)
    for (fqn, role), k in removed.items():
        if role == "norm":
            params -= 2 * k
    return macs, params


def count_macs(model: nn.Module, graph: QuantGraph) -> float:
    return sum(c["macs"] for c in layer_costs(model, graph).values())
