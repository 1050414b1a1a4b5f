"""Dependency groups from the captured graph (Torch-Pruning's DepGraph idea, derived from our
one recorded forward pass instead of per-model rules).

Every output channel of every Conv/Linear gets a global channel id. Walking the recorded nodes
in execution order, each tensor carries ``{axis: ids}``: for each axis that holds prunable
channels, the id of the channel at each position (-1: a fixed position, e.g. image channels).
The rules, one per op family (``_RULES``):

* Conv/Linear: the input's channel axis becomes the layer's *in* entry; the output gets fresh
  ids (its *out* entry). A depthwise conv (groups = in = out) passes ids through (in = out tied).
  A Linear over a non-last axis (token mixing) passes the other axes through.
* BatchNorm: a *norm* entry (affine and running statistics indexed by channel).
* elementwise ops (residual add, SE gating mul, ...): operands aligned by broadcasting; two
  tracked operands on one axis are *joined* position by position (union-find), so every tensor
  summed by a residual add shares one channel set; a same-sized fixed operand (a parameter,
  the input) blocks those channels.
* reshape/flatten: a channel axis merged with the axes after it (flatten into a Linear) maps
  channel c to its block of features; a channel axis split (heads) is not followed.
* cat / split / chunk along a channel axis shift and slice the ids (offsets); along other
  axes they pass ids through (cat joins the operands' ids). ``chunk`` into equal parts joins
  position i of every part (torch recomputes the parts from the pruned width); ``split`` and
  ``tensor_split`` along channels, whose sizes are constants of the code, block them.
* permute/transpose move axes; pools, pads and reductions over other axes keep them.
Anything else (LayerNorm/GroupNorm/softmax over channels, matmul, indexing a channel axis,
an op the rules do not know, the network output) *blocks* the channels it reads, with a reason.

A *unit* is one class of joined ids (one channel in every coupled layer); a *group* is the set
of units whose producers are the same layers. Pruning a unit removes its rows, columns and norm
entries everywhere (``surgery``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..graph.capture import Node, QuantGraph

Axes = dict[int, Tensor]  # axis -> global channel id per position (-1: fixed)

UNARY = {"relu", "relu_", "relu6", "hardtanh", "gelu", "silu", "hardswish", "tanh", "sigmoid",
         "hardsigmoid", "leaky_relu", "elu", "mish", "dropout", "contiguous", "clone", "to",
         "float", "detach", "type_as", "neg", "__neg__", "half", "double", "silu_", "gelu_",
         "hardswish_", "sigmoid_", "hardsigmoid_", "relu6_", "dropout_", "alpha_dropout",
         "identity", "softplus", "log_sigmoid", "sqrt", "exp", "erf", "abs"}
BINARY = {"add", "__add__", "__radd__", "__iadd__", "add_", "mul", "__mul__", "__rmul__",
          "__imul__", "mul_", "sub", "__sub__", "__rsub__", "__isub__", "div", "__truediv__",
          "__itruediv__", "div_", "where", "maximum", "minimum", "__and__", "pow", "__pow__"}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "unsqueeze_",
           "squeeze_", "view_as", "reshape_as"}
SAME_AXES = {"adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d",
             "adaptive_avg_pool1d", "avg_pool1d", "max_pool1d", "pad", "interpolate",
             "upsample", "upsample_nearest2d", "upsample_bilinear2d", "roll", "expand",
             "expand_as", "max_pool2d_with_indices", "channel_dropout", "dropout2d",
             "feature_dropout"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm"}


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}  # root -> reason

    def new(self, n: int) -> Tensor:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        return torch.arange(base, base + n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.blocked:
                self.blocked.setdefault(ra, self.blocked.pop(rb))

    def block(self, ids: Tensor, reason: str) -> None:
        for i in ids.tolist():
            if i >= 0:
                self.blocked.setdefault(self.find(i), reason)


@dataclass
class Entry:
    """One place channels live: ``role`` out (weight rows + bias), in (weight columns) or
    norm (BatchNorm affine + statistics) of module ``fqn``; ``ids`` per position."""
    fqn: str
    role: str
    ids: Tensor


@dataclass
class Unit:
    """One prunable channel class: its positions in every entry it touches."""
    uid: int
    where: list[tuple[str, str, Tensor]]  # (fqn, role, positions)
    group: int = -1


@dataclass
class Groups:
    """What the analysis found: units, groups (lists of unit indices), every entry, and the
    channels that could not be pruned with the reason."""
    units: list[Unit]
    groups: list[list[int]]
    entries: dict[tuple[str, str], Entry]
    sizes: dict[tuple[str, str], int]
    excluded: list[dict] = field(default_factory=list)  # {layer, channels, why}

    def group_layers(self, g: int) -> list[str]:
        u = self.units[self.groups[g][0]]
        return sorted({f for f, r, _ in u.where if r == "out"})

    def describe(self) -> dict[str, Any]:
        return {"groups": [{"id": g, "layers": self.group_layers(g), "units": len(us)}
                           for g, us in enumerate(self.groups)],
                "excluded": self.excluded}


class _Walker:
    def __init__(self, model: nn.Module, graph: QuantGraph):
        self.model, self.graph, self.nodes = model, graph, graph.nodes
        self.modules = dict(model.named_modules())
        self.layers = {l["node"]: l for l in graph.layers if l["type"] != "Embedding"}
        self.uf = UnionFind()
        self.entries: dict[tuple[str, str], Entry] = {}
        self.vals: dict[tuple[int, int], Axes] = {}
        self.reasons: dict[str, str] = {}

    # ---------------------------------------------------------------- helpers
    def val(self, n: Node, k: int) -> Axes:
        return self.vals.get((n.inputs[k], n.parts[k] if k < len(n.parts) else 0), {})

    def shape_of(self, n: Node, k: int) -> list[int]:
        src = self.nodes[n.inputs[k]]
        part = n.parts[k] if k < len(n.parts) else 0
        return src.part_shapes[part] if src.part_shapes else src.shape

    def block(self, axes: Axes, reason: str) -> None:
        for ids in axes.values():
            self.uf.block(ids, reason)

    def block_inputs(self, n: Node, reason: str) -> None:
        for k in range(len(n.inputs)):
            self.block(self.val(n, k), reason)

    def join(self, a: Tensor, b: Tensor, reason: str) -> Tensor:
        """Position-wise union of two id vectors; a fixed position blocks the other's id."""
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                self.uf.union(x, y)
            elif x >= 0 or y >= 0:
                self.uf.block(torch.tensor([max(x, y)]), reason)
        return torch.where(a >= 0, a, b)

    def entry(self, fqn: str, role: str, ids: Tensor) -> None:
        old = self.entries.get((fqn, role))
        if old is None:
            self.entries[(fqn, role)] = Entry(fqn, role, ids.clone())
        else:  # a module called twice: its channels are the same channels
            old.ids = self.join(old.ids, ids, f"{fqn} is called twice with other channels")

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        for n in self.nodes:
            if not n.dynamic or n.kind in ("input", "param"):
                continue
            out = self.rule(n)
            if isinstance(out, list):
                for k, axes in enumerate(out):
                    self.vals[(n.idx, k)] = axes
            else:
                self.vals[(n.idx, 0)] = out
        for i in self.graph.outputs:
            self.block(self.vals.get((i, 0), {}), "reaches the network output")
            for k in range(1, len(self.nodes[i].part_shapes or [])):
                self.block(self.vals.get((i, k), {}), "reaches the network output")

    def rule(self, n: Node) -> Axes | list[Axes]:
        op = n.op
        if n.idx in self.layers:
            return self.layer(n)
        if n.kind == "batch_norm":
            return self.batch_norm(n)
        if n.kind in ("layer_norm", "group_norm", "rms_norm"):
            return self.norm_other(n)
        if op in UNARY:
            return dict(self.val(n, 0))
        if op in BINARY:
            return self.elementwise(n)
        if op in RESHAPE:
            return self.reshape(n)
        if op in SAME_AXES:
            return self.same_axes(n)
        if op in ("permute", "transpose", "swapaxes", "movedim", "mT", "T", "t"):
            return self.permute(n)
        if op in REDUCE:
            return self.reduce(n)
        if op in ("cat", "concat", "stack"):
            return self.cat(n)
        if op in ("split", "chunk", "unbind", "tensor_split"):
            return self.split(n)
        if op in ("__getitem__", "narrow", "select"):
            return self.getitem(n)
        if op in ("softmax", "log_softmax"):
            return self.softmax(n)
        self.block_inputs(n, f"{op} (in {n.module or 'the root'}): an op the channel "
                             "rules do not follow")
        return {}

    # ---------------------------------------------------------------- layers
    def layer(self, n: Node) -> Axes:
        fqn = self.layers[n.idx]["fqn"]
        mod = self.modules[fqn]
        inp = self.val(n, 0)
        ndim = len(n.shape)
        ch_axis = 1 if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else ndim - 1
        if isinstance(mod, nn.Linear) and len(self.shape_of(n, 0)) == 1:
            ch_axis = 0
        rest = {a: ids for a, ids in inp.items() if a != ch_axis}
        if ch_axis != ndim - 1 or isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if rest:  # a conv mixes its spatial axes: nothing but channels is tracked there
                self.block(rest, f"{fqn}: channels on a spatial axis of a convolution")
            rest = {}
        groups = getattr(mod, "groups", 1)
        in_ids = inp.get(ch_axis, torch.full((self.shape_of(n, 0)[ch_axis],), -1))
        if groups > 1:
            if groups == mod.in_channels == mod.out_channels:  # depthwise: in = out tied
                self.entry(fqn, "out", in_ids)
                return {**rest, ch_axis: in_ids}
            self.uf.block(in_ids, f"{fqn}: grouped convolution (groups={groups}) with "
                          "channels per group > 1")
            return rest
        if ch_axis in inp:
            self.entry(fqn, "in", in_ids)
        old = self.entries.get((fqn, "out"))
        ids = old.ids if old is not None else self.uf.new(n.shape[ch_axis])
        self.entry(fqn, "out", ids)
        return {**rest, ch_axis: ids}

    def batch_norm(self, n: Node) -> Axes:
        inp = dict(self.val(n, 0))
        mod = self.modules.get(n.module)
        if 1 in inp:
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.num_features == len(inp[1]):
                self.entry(n.module, "norm", inp[1])
            else:
                self.uf.block(inp[1], f"batch_norm in {n.module}: not a BatchNorm module's")
        return inp

    def norm_other(self, n: Node) -> Axes:
        inp = dict(self.val(n, 0))
        ndim = len(n.shape)
        if n.kind == "group_norm":
            normed = set(range(1, ndim))
        else:
            args = (n.meta or {}).get("args", ())
            shape = args[0] if args else [n.shape[-1]]
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            normed = set(range(ndim - k, ndim))
        for a in [a for a in inp if a in normed]:
            self.uf.block(inp.pop(a), f"{n.kind} in {n.module}: normalised over the channels "
                          "(removing channels changes the statistics)")
        return inp

    # ---------------------------------------------------------------- elementwise
    def elementwise(self, n: Node) -> Axes:
        ndim = len(n.shape)
        out: Axes = {}
        for k in range(len(n.inputs)):
            shape, axes = self.shape_of(n, k), self.val(n, k)
            off = ndim - len(shape)
            for a, ids in axes.items():
                if shape[a] == 1:
                    continue
                oa = a + off
                out[oa] = ids if oa not in out else self.join(
                    out[oa], ids, f"{n.op} in {n.module}")
        for k in range(len(n.inputs)):  # a same-sized untracked operand pins those channels
            shape, axes = self.shape_of(n, k), self.val(n, k)
            off = ndim - len(shape)
            for oa, ids in out.items():
                a = oa - off
                if 0 <= a < len(shape) and shape[a] == len(ids) and a not in axes:
                    src = self.nodes[n.inputs[k]]
                    what = src.op if src.kind == "param" else "an untracked tensor"
                    self.uf.block(ids, f"{n.op} in {n.module or 'the root'} with {what} "
                                  "over the channels")
        return out

    # ---------------------------------------------------------------- shapes
    def reshape(self, n: Node) -> Axes:
        return self.map_reshape(n, self.val(n, 0), self.shape_of(n, 0), n.shape)

    def map_reshape(self, n: Node, inp: Axes, s: list[int], t: list[int]) -> Axes:
        out: Axes = {}
        for a, ids in inp.items():
            got = _reshape_axis(s, t, a)
            if got is None:
                self.uf.block(ids, f"{n.op} in {n.module or 'the root'} splits or mixes a "
                              "channel axis (e.g. attention heads, channel shuffle)")
                continue
            b, lead, inner = got
            out[b] = ids.repeat_interleave(inner).repeat(lead)
        return out

    def same_axes(self, n: Node) -> Axes:
        s, inp = self.shape_of(n, 0), self.val(n, 0)
        off = len(n.shape) - len(s)
        out: Axes = {}
        for a, ids in inp.items():
            if n.shape[a + off] == len(ids):
                out[a + off] = ids
            else:
                self.uf.block(ids, f"{n.op} in {n.module} changes a channel axis' size")
        return out

    def permute(self, n: Node) -> Axes:
        inp, nd = self.val(n, 0), len(n.shape)
        args = list((n.meta or {}).get("args", ()))
        kw = (n.meta or {}).get("kwargs", {})
        order = list(range(nd))
        if n.op == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
            order = [d % nd for d in (dims or kw.get("dims", ()))]
        elif n.op in ("transpose", "swapaxes"):
            d0, d1 = (args + [kw.get("dim0"), kw.get("dim1")])[:2]
            d0, d1 = d0 % nd, d1 % nd
            order[d0], order[d1] = order[d1], order[d0]
        elif n.op in ("mT",):
            order[-1], order[-2] = order[-2], order[-1]
        elif n.op in ("T", "t"):
            order = order[::-1]
        else:
            self.block(inp, f"{n.op} in {n.module}: not followed")
            return {}
        return {order.index(a): ids for a, ids in inp.items()}

    def reduce(self, n: Node) -> Axes:
        inp, s = self.val(n, 0), self.shape_of(n, 0)
        args = list((n.meta or {}).get("args", ()))
        kw = (n.meta or {}).get("kwargs", {})
        dims = kw.get("dim", args[0] if args else None)
        if dims is None or dims == "T":
            self.block(inp, f"{n.op} over every axis in {n.module}")
            return {}
        dims = {d % len(s) for d in (dims if isinstance(dims, tuple) else (dims,))}
        keep = len(n.shape) == len(s)
        out: Axes = {}
        for a, ids in inp.items():
            if a in dims:
                self.uf.block(ids, f"{n.op} over the channels in {n.module}")
            else:
                out[a if keep else a - sum(d < a for d in dims)] = ids
        return out

    def softmax(self, n: Node) -> Axes:
        inp = dict(self.val(n, 0))
        args = list((n.meta or {}).get("args", ()))
        dim = (n.meta or {}).get("kwargs", {}).get("dim", args[0] if args else -1)
        dim = dim % len(n.shape) if isinstance(dim, int) else None
        if dim is None or dim in inp:
            self.block(inp, f"softmax over the channels in {n.module}")
            inp.pop(dim, None)
        return inp

    def cat(self, n: Node) -> Axes:
        args = list((n.meta or {}).get("args", ()))
        dim = (n.meta or {}).get("kwargs", {}).get("dim", args[0] if args else 0)
        nd = len(n.shape)
        dim = dim % nd
        stack = n.op == "stack"
        out: Axes = {}
        pieces = []
        for k in range(len(n.inputs)):
            shape, axes = self.shape_of(n, k), self.val(n, k)
            if not stack and len(shape) != nd:  # torch.cat skips a 1-D empty tensor
                continue
            for a, ids in axes.items():
                oa = a + (1 if stack and a >= dim else 0)
                if oa == dim and not stack:
                    continue
                out[oa] = ids if oa not in out else self.join(out[oa], ids, f"cat in {n.module or 'the root'}")
            if not stack:
                pieces.append(axes.get(dim, torch.full((shape[dim],), -1)))
        if not stack and any((p >= 0).any() for p in pieces):
            out[dim] = torch.cat(pieces)
        for k in range(len(n.inputs)):  # an untracked operand pins the other axes' channels
            axes = self.val(n, k)
            for oa, ids in out.items():
                a = oa - (1 if stack and oa > dim else 0)
                if oa != dim and a not in axes:
                    self.uf.block(ids, f"{n.op} in {n.module or 'the root'} with an untracked tensor "
                                  "(e.g. a class token)")
        return out

    def split(self, n: Node) -> list[Axes]:
        inp, s = self.val(n, 0), self.shape_of(n, 0)
        args = list((n.meta or {}).get("args", ()))
        kw = (n.meta or {}).get("kwargs", {})
        shapes = n.part_shapes or [n.shape]
        if n.op == "unbind":
            dim = kw.get("dim", args[0] if args else 0) % len(s)
        else:
            dim = kw.get("dim", args[1] if len(args) > 1 else 0) % len(s)
        widths = [1 if n.op == "unbind" else shape[dim] for shape in shapes]
        if dim in inp and n.op != "unbind":
            ids = inp[dim]
            if n.op == "chunk" and len(set(widths)) == 1:
                # chunk recomputes equal parts from the pruned width: position i of every
                # part goes together
                w = widths[0]
                for j in range(1, len(widths)):
                    self.join(ids[:w], ids[j * w:(j + 1) * w], f"chunk in {n.module}")
            else:
                why = ("chunk into unequal parts" if n.op == "chunk" else
                       f"{n.op} with sizes that are constants of the model's code")
                self.uf.block(ids, f"{why} along the channels in {n.module or 'the root'}")
        outs: list[Axes] = []
        start = 0
        for width in widths:
            part: Axes = {}
            for a, ids in inp.items():
                if a == dim:
                    if n.op == "unbind":
                        self.uf.block(ids, f"unbind over the channels in {n.module}")
                    else:
                        part[a] = ids[start:start + width]
                else:
                    part[a - (1 if n.op == "unbind" and a > dim else 0)] = ids
            outs.append(part)
            start += width
        return outs

    def getitem(self, n: Node) -> Axes:
        inp, s = self.val(n, 0), self.shape_of(n, 0)
        if n.op != "__getitem__":
            self.block(inp, f"{n.op} (indexing) in {n.module}")
            return {}
        idx = (n.meta or {}).get("args", ((),))[0]
        idx = idx if isinstance(idx, tuple) and (not idx or idx[0] != "slice") else (idx,)
        got = _index_axes(idx, len(s))
        out: Axes = {}
        for a, ids in inp.items():
            where = got.get(a) if got is not None else None
            if where is None or n.shape[where] != len(ids):
                self.uf.block(ids, f"indexing a channel axis in {n.module or 'the root'} "
                              "(its bounds are constants of the model's code)")
            else:
                out[where] = ids
        return out


def _reshape_axis(s: list[int], t: list[int], a: int) -> tuple[int, int, int] | None:
    """Where axis ``a`` of shape ``s`` lands in shape ``t`` (row-major reshape): (axis b,
    lead, inner) when t[b] = lead·C·inner merges whole axes before and after ``a``; None
    when the channel axis is split or mixed."""
    c = s[a]
    before, after = math.prod(s[:a]), math.prod(s[a + 1:])
    acc = 1
    for b, tb in enumerate(t):
        if before % acc == 0 and tb % c == 0:
            lead = before // acc
            inner = tb // (c * lead) if tb % (c * lead) == 0 else None
            if (inner is not None and _suffix_product(s[:a], lead)
                    and _prefix_product(s[a + 1:], inner)
                    and math.prod(t[b + 1:]) * inner == after):
                return b, lead, inner
        acc *= tb
        if acc > before:
            return None
    return None


def _suffix_product(dims: list[int], p: int) -> bool:
    acc = 1
    for d in reversed([1] + dims):
        acc *= d
        if acc == p:
            return True
    return p == 1


def _prefix_product(dims: list[int], p: int) -> bool:
    acc = 1
    if p == 1:
        return True
    for d in dims:
        acc *= d
        if acc == p:
            return True
    return False


def _index_axes(idx: tuple, ndim: int) -> dict[int, int | None] | None:
    """{input axis: output axis} of a basic index (ints, slices, None, ...); an axis a slice
    narrows maps to None is decided by the caller from sizes; None for advanced indexing."""
    if any(x == "T" or isinstance(x, (list, bool)) for x in idx):
        return None
    n_real = sum(1 for x in idx if x not in (None, "..."))
    out: dict[int, int | None] = {}
    a = b = 0
    for x in idx:
        if x == "...":
            for _ in range(ndim - n_real):
                out[a] = b
                a, b = a + 1, b + 1
        elif x is None:
            b += 1
        elif isinstance(x, int):
            a += 1
        else:  # a slice: the caller checks the size is unchanged
            out[a] = b
            a, b = a + 1, b + 1
    while a < ndim:
        out[a] = b
        a, b = a + 1, b + 1
    return out


def dependency_groups(model: nn.Module, graph: QuantGraph) -> Groups:
    """Units and groups of ``model`` from its captured ``graph`` (see the module docstring)."""
    w = _Walker(model, graph)
    w.run()
    uf = w.uf
    by_class: dict[int, dict[tuple[str, str], list[int]]] = {}
    for key, e in w.entries.items():
        for pos, i in enumerate(e.ids.tolist()):
            if i >= 0:
                by_class.setdefault(uf.find(i), {}).setdefault(key, []).append(pos)
    units, excluded = [], {}
    for root, places in by_class.items():
        if root in uf.blocked:
            for f, r in places:
                if r == "out":
                    excluded.setdefault((f, uf.blocked[root]), 0)
                    excluded[(f, uf.blocked[root])] += 1
            continue
        if not any(r == "out" for _, r in places):
            continue
        units.append(Unit(len(units), [(f, r, torch.tensor(p)) for (f, r), p in
                                       sorted(places.items())]))
    groups_by: dict[tuple, list[int]] = {}
    for u in units:
        key = tuple(sorted(f for f, r, _ in u.where if r == "out"))
        u.group = groups_by.setdefault(key, [])
        u.group.append(u.uid)
    groups = list(groups_by.values())
    for g, us in enumerate(groups):
        for i in us:
            units[i].group = g
    sizes = {k: len(e.ids) for k, e in w.entries.items()}
    return Groups(units, groups, w.entries, sizes,
                  [{"layer": f, "channels": c, "why": why}
                   for (f, why), c in sorted(excluded.items())])
