"""Capture a model once into a QuantGraph by recording one real forward pass.

Instead of symbolic tracing (torch.fx fails on data-dependent control flow, which HF and timm
models are full of), capture runs the model on one calibration item under a
``TorchFunctionMode`` that records every torch function call that returns a tensor: its op,
the innermost running module, and which earlier calls produced its tensor inputs. Everything
that runs is seen, including ``F.scaled_dot_product_attention`` and matmuls written inline.
The price: the graph describes the path this input took (control flow is not generalised),
which is exactly what calibration needs.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .rewrite import is_identity_bn
from .tracker import FUNCTIONAL_KINDS, SITE_KINDS, ModuleTracker

KINDS = {
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv3d", "linear": "linear",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose",
    "conv_transpose3d": "conv_transpose", "einsum": "einsum",
    "softmax": "softmax", "gelu": "gelu", "silu": "silu", "relu": "relu", "relu_": "relu",
    "hardtanh": "relu6", "relu6": "relu6", "hardswish": "hardswish", "sigmoid": "sigmoid",
    "layer_norm": "layer_norm", "batch_norm": "batch_norm", "group_norm": "group_norm",
    "rms_norm": "rms_norm", "embedding": "embedding",
    "add": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add", "add_": "add",
    "multi_head_attention_forward": "mha", "addmm": "addmm", "baddbmm": "addmm",
    **FUNCTIONAL_KINDS,
}
# ops that move or reshape values without computing new ones
PASSTHROUGH = {
    "view", "reshape", "permute", "transpose", "flatten", "contiguous", "__getitem__",
    "dropout", "unsqueeze", "squeeze", "clone", "to", "float", "expand", "chunk", "split",
    "unbind", "type_as", "unflatten", "narrow", "select", "detach", "mT", "T",
    "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "mean", "cat", "roll", "pad",
}
SUPPORTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
# parameterised modules that are fine left in float (not counted as unsupported)
FLOAT_OK = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding,
            nn.PReLU)


@dataclass
class Node:
    idx: int
    kind: str              # canonical kind, "input", "param" or "other"
    op: str                # the torch function's name
    module: str            # fqn of the innermost running module ("" = root)
    inputs: list[int]      # indices of nodes producing tensor inputs
    shape: list[int]
    dynamic: bool          # depends on the model input (False for params/constants)
    key: str | None = None  # functional-site name for matmul/sdpa/add
    users: int = 0
    parts: list[int] = field(default_factory=list)  # which output of each input's producer
    meta: Any = None        # plain non-tensor arguments of structural ops (cat dim, ...)
    part_shapes: list[list[int]] | None = None  # every output's shape (multi-output ops)


@dataclass
class QuantGraph:
    """What capture found: compute layers, functional sites, blocks and what stays float."""

    nodes: list[Node]
    layers: list[dict]          # {fqn, type, node, source}; Conv/Linear/Embedding
    functional: list[dict]      # {key, kind, node, sources}: matmul, sdpa, residual add
    blocks: list[dict]          # {name, add_node, layers}
    bn_folds: list[tuple[str, str]]
    unsupported: list[dict]     # {what, where, why}
    counts: dict[str, int] = field(default_factory=dict)
    outputs: list[int] = field(default_factory=list)  # nodes the model returns

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (nodes left out)."""
        d = asdict(self)
        d.pop("nodes")
        return d

    def source_of(self, node_idx: int) -> str:
        """Kind of the op that computed a node's first tensor input (through reshapes)."""
        n = self.nodes[node_idx]
        return _source_kind(self.nodes, n.inputs[0]) if n.inputs else "input"


def _source_kind(nodes: list[Node], idx: int) -> str:
    n = nodes[idx]
    while n.kind == "other" and n.op in PASSTHROUGH and n.inputs:
        n = nodes[n.inputs[0]]
    return n.op if n.kind == "other" else n.kind


class _Recorder(TorchFunctionMode):
    def __init__(self, tracker: ModuleTracker, params: dict[int, str]):
        super().__init__()
        self.tracker, self.params = tracker, params
        self.nodes: list[Node] = []
        # id(tensor) -> (weak reference, node): the recorded tensors are not kept alive (a
        # forward's intermediates would all stay in memory); a reused id is told apart by its
        # dead reference
        self.producer: dict[int, tuple[weakref.ref, int]] = {}

    def add(self, kind: str, op: str, inputs: list[int], out: Tensor, dynamic: bool,
            key: str | None = None, parts: list[int] | None = None, meta: Any = None) -> int:
        node = Node(len(self.nodes), kind, op, self.tracker.current, inputs,
                    list(out.shape), dynamic, key, parts=parts or [0] * len(inputs),
                    meta=meta)
        for i in inputs:
            self.nodes[i].users += 1
        self.nodes.append(node)
        self.producer[id(out)] = (weakref.ref(out), node.idx, 0)
        return node.idx

    def recorded(self, t: Tensor) -> int | None:
        """The node that produced ``t``, None if it was not recorded."""
        got = self.producer.get(id(t))
        return got[1] if got is not None and got[0]() is t else None

    def part_of(self, t: Tensor) -> int:
        """Which output of its producer ``t`` is (0 unless a multi-output op made it)."""
        got = self.producer.get(id(t))
        return got[2] if got is not None and got[0]() is t else 0

    def node_of(self, t: Tensor) -> int:
        idx = self.recorded(t)
        if idx is None:
            name = self.params.get(id(t), "constant")
            idx = self.add("param", name, [], t, dynamic=False)
        return idx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outs:
            return out
        op = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        parts = [self.part_of(t) for t in tensors]
        ins = [self.node_of(t) for t in tensors]
        dynamic = any(self.nodes[i].dynamic for i in ins)
        kind = KINDS.get(op, "other")
        key = self.tracker.next_key(kind) if kind in SITE_KINDS else None
        meta = plain_args(args[1:], kwargs) if op in STRUCTURAL else None
        first = self.add(kind, op, ins, outs[0], dynamic, key, parts, meta)
        if len(outs) > 1:
            self.nodes[first].part_shapes = [list(t.shape) for t in outs]
        for k, t in enumerate(outs[1:], 1):
            self.producer[id(t)] = (weakref.ref(t), first, k)
        return out


# ops whose non-tensor arguments (dims, sizes, indices) channel tracking needs (prune.groups)
STRUCTURAL = {"cat", "concat", "stack", "split", "chunk", "unbind", "permute", "transpose",
              "movedim", "__getitem__", "narrow", "select", "mean", "sum", "amax", "amin",
              "max", "min", "std", "var", "norm", "softmax", "log_softmax", "flatten",
              "layer_norm", "group_norm", "rms_norm", "tensor_split", "swapaxes"}


def plain_args(args: tuple, kwargs: dict) -> Any:
    """Non-tensor arguments as plain data: ints, tuples, slices as ("slice", a, b, c),
    Ellipsis as "...", a tensor as "T"."""
    def conv(x):
        if isinstance(x, Tensor):
            return "T"
        if isinstance(x, slice):
            return ("slice", x.start, x.stop, x.step)
        if x is Ellipsis:
            return "..."
        if isinstance(x, (tuple, list)):
            return tuple(conv(v) for v in x)
        if isinstance(x, (bool, int, float, str)) or x is None:
            return x
        return repr(type(x).__name__)
    return {"args": conv(tuple(args)), "kwargs": {k: conv(v) for k, v in kwargs.items()}}


def call_model(model: nn.Module, item: Any, params: dict[str, Any] | None = None) -> Any:
    """Run the model on one calibration item: Tensor, tuple (positional) or dict (keywords);
    with ``params`` ({fqn: tensor}) those tensors stand in for the model's own
    (``torch.func.functional_call``: training through a substituted weight)."""
    args, kwargs = (((), item) if isinstance(item, dict) else
                    (tuple(item), {}) if isinstance(item, (tuple, list)) else ((item,), {}))
    if params is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, params, args, kwargs, strict=False)


GRAPH_ATTR = "_slimtorch_graph"


def _signature(model: nn.Module) -> tuple:
    """Module names, types and parameter shapes: what a graph depends on (pruning changes
    shapes, a rewrite changes modules)."""
    return (tuple((n, type(m).__name__) for n, m in model.named_modules()),
            tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))


def remember(model: nn.Module, graph: "QuantGraph") -> None:
    """Keep ``graph`` with the model for the methods that query it (``graph_of``), tagged with
    the model's module structure as it is now."""
    model.__dict__[GRAPH_ATTR] = (graph, _signature(model))


def graph_of(model: nn.Module, example: Any) -> "QuantGraph":
    """The model's graph: the one ``prepare`` captured, while the module structure is unchanged
    (capture once); else a fresh capture (a method that rewrote modules), remembered."""
    got = model.__dict__.get(GRAPH_ATTR)
    if got is not None and got[1] == _signature(model):
        return got[0]
    graph = capture(model, example)
    remember(model, graph)
    return graph


def capture(model: nn.Module, example: Any) -> QuantGraph:
    """Record one forward pass of ``model`` on ``example`` and analyse it."""
    params = {id(p): n for n, p in model.named_parameters()}
    params.update({id(b): n for n, b in model.named_buffers()})
    tracker = ModuleTracker(model)
    rec = _Recorder(tracker, params)
    try:
        for t in tree_flatten(example)[0]:
            if isinstance(t, Tensor):
                rec.add("input", "input", [], t, dynamic=True)
        with torch.no_grad(), rec:
            out = call_model(model, example)
    finally:
        tracker.close()
    outputs = [i for i in (rec.recorded(t) for t in tree_flatten(out)[0]
                           if isinstance(t, Tensor)) if i is not None]
    graph = analyse(model, rec.nodes, outputs)
    graph.outputs = outputs
    return graph


def _is_own_weight(model: nn.Module, mod: nn.Module | None, fqn: str, name: str) -> bool:
    """The parameter the call read (recorded under ``name``) is the module's own ``weight``.
    A tied parameter (an LM head sharing the embedding matrix) is recorded under its first
    name, so identity decides, not the name."""
    if name == (f"{fqn}.weight" if fqn else "weight"):
        return True
    try:
        return model.get_parameter(name) is getattr(mod, "weight", None)
    except AttributeError:
        return False


def analyse(model: nn.Module, nodes: list[Node], outputs: list[int]) -> QuantGraph:
    """Layers, functional sites and unsupported ops of a recorded graph; ``outputs``: the
    nodes the model returns."""
    modules = dict(model.named_modules())
    layers, functional, unsupported = [], [], []
    for n in nodes:
        mod = modules.get(n.module)
        if n.kind in ("conv", "linear"):
            weight_node = nodes[n.inputs[1]] if len(n.inputs) > 1 else None
            owns = (isinstance(mod, SUPPORTED_LAYERS) and weight_node is not None
                    and _is_own_weight(model, mod, n.module, weight_node.op))
            if owns and n.inputs and nodes[n.inputs[0]].dynamic:
                layers.append({"fqn": n.module, "type": type(mod).__name__, "node": n.idx,
                               "source": _source_kind(nodes, n.inputs[0]),
                               "depthwise": 1 < getattr(mod, "groups", 1) == getattr(
                                   mod, "in_channels", 0)})
            else:
                unsupported.append({"what": n.op, "where": n.module or "(root)",
                                    "why": "functional call with a weight not owned by a "
                                           "Conv/Linear module; left in float"})
        elif n.kind == "embedding":
            weight_node = nodes[n.inputs[1]] if len(n.inputs) > 1 else None
            if isinstance(mod, nn.Embedding) and weight_node is not None and \
                    _is_own_weight(model, mod, n.module, weight_node.op):
                layers.append({"fqn": n.module, "type": "Embedding", "node": n.idx,
                               "source": "input"})
        elif n.kind in ("matmul", "sdpa"):
            dyn = [i for i in n.inputs if nodes[i].dynamic]
            if n.kind == "sdpa" or len(dyn) >= 2:
                functional.append({"key": n.key, "kind": n.kind, "node": n.idx,
                                   "sources": [_source_kind(nodes, i) for i in n.inputs[:3]]})
            elif dyn:
                unsupported.append({"what": n.op, "where": n.module or "(root)",
                                    "why": "matmul with a constant operand; left in float"})
        elif n.kind == "addmm" and any(nodes[i].dynamic for i in n.inputs):
            unsupported.append({"what": n.op, "where": n.module or "(root)",
                                "why": "addmm/baddbmm (e.g. a Conv1D layer computing bias + x@W) "
                                       "is not quantized yet; left in float"})
        elif n.kind in ("conv3d", "conv_transpose", "einsum", "mha"):
            unsupported.append({"what": n.op, "where": n.module or "(root)",
                                "why": f"{n.kind} is not quantized yet; left in float"})
    functional += _add_sites(nodes, layers, set(outputs))
    unsupported += _unused_param_modules(model, layers, nodes)
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.kind] = counts.get(n.kind, 0) + 1
    return QuantGraph(nodes, layers, functional, _blocks(nodes, layers),
                      _bn_folds(nodes, modules), _dedupe(unsupported), counts)


# elementwise ops an integer engine folds into the quantized output range of their producer
FOLDED_ACTIVATIONS = {"relu", "relu6"}
# ops that only re-lay out values: a per-tensor quantizer of their output equals their input's
VIEWS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "clone", "dropout",
         "unsqueeze", "squeeze", "detach", "unflatten", "mT", "T"}


def view_source(nodes: list[Node], idx: int) -> int:
    """The node whose values ``idx`` shows, looking through pure re-layouts (VIEWS)."""
    while nodes[idx].kind == "other" and nodes[idx].op in VIEWS and nodes[idx].inputs:
        idx = nodes[idx].inputs[0]
    return idx


def walk_forward(nodes: list[Node], users: dict[int, list[int]], start: int,
                 through: Callable[[Node, int], bool], outputs: set[int]
                 ) -> tuple[set[int], bool]:
    """Follow node ``start``'s values forward: a user ``n`` reached from node ``i`` is passed
    through when ``through(n, i)``. Returns (the first users not passed through, whether
    ``start`` or a node passed through is a model output)."""
    stops: set[int] = set()
    todo, seen, returned = [start], {start}, False
    while todo:
        i = todo.pop()
        returned = returned or i in outputs
        for u in users.get(i, []):
            if u in seen:
                continue
            seen.add(u)
            (todo.append if through(nodes[u], i) else stops.add)(u)
    return stops, returned


def users_of(nodes: list[Node]) -> dict[int, list[int]]:
    """{node: the nodes that read it}, each reader once per node it reads."""
    users: dict[int, list[int]] = {}
    for n in nodes:
        for i in dict.fromkeys(n.inputs):
            users.setdefault(i, []).append(n.idx)
    return users


def _readers(nodes: list[Node], users: dict[int, list[int]], idx: int,
             outputs: set[int]) -> list[int] | None:
    """The compute nodes that read node ``idx``'s values, looking through passthrough ops and
    foldable activations; None when the value (or a view of it) is a model output."""
    stops, returned = walk_forward(nodes, users, idx, lambda n, _: n.kind in FOLDED_ACTIVATIONS
                                   or (n.kind == "other" and n.op in PASSTHROUGH), outputs)
    return None if returned else sorted(stops)


def _add_sites(nodes: list[Node], layers: list[dict], outputs: set[int]) -> list[dict]:
    """Residual adds worth quantizing: two same-shaped activations whose sum is read only by
    quantized layers or by other such adds (through ReLU and passthrough ops). Quantizing both
    operands lets an integer engine run the producers and the add in int8 (QLinearConv →
    QLinearAdd); an add that feeds a float op (LayerNorm, the model output) is left alone."""
    users = users_of(nodes)
    layer_nodes = {l["node"] for l in layers if l["type"] != "Embedding"}
    cand = {n.idx: _readers(nodes, users, n.idx, outputs) for n in nodes
            if n.kind == "add" and n.key and len(n.inputs) == 2
            and all(nodes[i].dynamic and nodes[i].shape == n.shape for i in n.inputs)}
    cand = {i: r for i, r in cand.items() if r}
    changed = True
    while changed:  # drop adds read by anything else, until no more drop out
        keep = {i: r for i, r in cand.items() if all(j in layer_nodes or j in cand for j in r)}
        changed, cand = len(keep) != len(cand), keep
    return [{"key": nodes[i].key, "kind": "add", "node": i,
             "sources": [_source_kind(nodes, j) for j in nodes[i].inputs]} for i in sorted(cand)]


def _unused_param_modules(model, layers, nodes) -> list[dict]:
    """Modules with their own parameters that are neither quantized layers nor float-ok."""
    seen = {l["fqn"] for l in layers}
    ran = {n.module for n in nodes}
    out = []
    for name, mod in model.named_modules():
        if name in seen or isinstance(mod, FLOAT_OK) or name not in ran:
            continue
        if any(True for _ in mod.parameters(recurse=False)) and isinstance(
                mod, (SUPPORTED_LAYERS + (nn.ConvTranspose2d, nn.Conv3d, nn.RNNBase))):
            if not isinstance(mod, SUPPORTED_LAYERS):
                out.append({"what": type(mod).__name__, "where": name,
                            "why": "layer type not quantized yet; left in float"})
    return out


def _dedupe(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for it in items:
        k = (it["what"], it["where"])
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def _ancestors(nodes: list[Node], start: int, stop: int) -> set[int]:
    """Dynamic ancestors of node ``start`` (inclusive) with index > ``stop``."""
    seen, todo = set(), [start]
    while todo:
        i = todo.pop()
        if i in seen or i <= stop or not nodes[i].dynamic:
            continue
        seen.add(i)
        todo.extend(nodes[i].inputs)
    return seen


def _blocks(nodes: list[Node], layers: list[dict]) -> list[dict]:
    """Residual blocks: for each add of two same-shaped activations, the layers between the
    point where the two branches fork and the add."""
    layer_at = {l["node"]: l["fqn"] for l in layers}
    blocks = []
    for n in nodes:
        if n.kind != "add" or len(n.inputs) != 2:
            continue
        a, b = (nodes[i] for i in n.inputs)
        if not (a.dynamic and b.dynamic and a.shape == b.shape == n.shape):
            continue
        anc_a, anc_b = _ancestors(nodes, a.idx, -1), _ancestors(nodes, b.idx, -1)
        common = anc_a & anc_b
        if not common:  # branches from different inputs (e.g. summed embeddings): no residual
            continue
        fork = max(common)
        members = (_ancestors(nodes, a.idx, fork) | _ancestors(nodes, b.idx, fork))
        inner = [layer_at[i] for i in sorted(i for i in members if i in layer_at)]
        if inner:
            blocks.append({"name": common_prefix(inner) or n.module, "add_node": n.idx,
                           "fork_node": fork, "layers": inner})
    return blocks


def common_prefix(names: list[str]) -> str:
    """Longest common dotted prefix of module names ("" for the root)."""
    parts = [n.split(".") if n else [] for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _bn_folds(nodes: list[Node], modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """(conv/linear fqn, batchnorm fqn) pairs where the BN reads only that layer's output (a BN
    already folded, kept as the identity normalisation, is not folded again)."""
    folds = []
    for n in nodes:
        if n.kind != "batch_norm" or not n.inputs:
            continue
        src = nodes[n.inputs[0]]
        bn = modules.get(n.module)
        layer = modules.get(src.module)
        if (src.kind in ("conv", "linear") and src.users == 1
                and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and isinstance(layer, SUPPORTED_LAYERS) and bn.track_running_stats
                and not is_identity_bn(bn)):
            folds.append((src.module, n.module))
    return folds
