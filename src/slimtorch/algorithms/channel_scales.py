"""Per-input-channel scaling of Linear groups, exact in float: what SmoothQuant and AWQ share.

A *scale group* is the set of quantized Linear layers that read one tensor X (q/k/v read one
norm output, gate/up another). Scaling its channels by s > 0 — X ← X/s, W ← W·diag(s) for
every layer of the group — keeps the float function when X/s is produced exactly. Where 1/s
goes is found from the QuantGraph, never from module names or classes (``fold``):

* ``norm``: X is the output of an op that multiplies each channel by a 1-D parameter — the
  elementwise affine of ``layer_norm`` / ``rms_norm``, or an RMSNorm written ``weight * x``
  (HF Llama), optionally followed by ``+ bias`` — and nothing but the group reads X: those
  parameters are divided by s.
* ``linear``: X is another Linear P's output reached through ops linear per channel in P's
  value (re-layouts, the value operand of an attention matmul / SDPA — a weighted sum over
  tokens —, an elementwise product with a tensor not computed from P: ``act(gate) * up``),
  and P's output reaches nothing else: P's rows (and bias) are divided by s. The channel
  correspondence through the head reshapes is checked on one calibration item by scaling P's
  output with random positive factors; with grouped-query attention v_proj has fewer channels
  than o_proj reads (they are repeated), so there is no such fold.
* ``explicit``: otherwise (a GELU output, a post-LN output that also feeds the residual, a
  LayerNorm without affine, GQA's o_proj) each layer divides its own input by s
  (``QuantLayerMixin.set_input_scale``, recorded in the plan), exact in float; a method may
  instead skip such a group.

Statistics are streamed by the layer-wise runner's hooks (``runner.layerwise.feed``) into
``ChannelStats`` (per-channel max|x|, mean|x| and a seeded uniform subsample of token rows for
the searches), never the whole calibration set; ``run_groups`` feeds a list of steps (all
groups at once, or one residual block at a time) and solves each group in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.calibration import take
from ..graph.capture import QuantGraph, VIEWS, call_model, users_of, walk_forward
from ..quant.prepare import META_ATTR, quantizers_off
from ..quant.quantizer import Quantizer
from ..quant.spec import QuantSpec
from ..runner.layerwise import feed
from ..runner.recon_cache import _Stop
from .vit_sites import SAFE_BETWEEN, first_float, recapture

NORM_KINDS = {"layer_norm", "rms_norm"}
MUL_OPS = {"mul", "__mul__", "__rmul__", "mul_"}
RELAYOUT = VIEWS | {"expand", "to", "float", "type_as"}  # move values, keep them per channel
PROBE_RTOL = 1e-4


@dataclass
class ScaleGroup:
    layers: list[str]                 # Linear fqns reading one tensor, in graph order
    source: str                       # "norm" | "linear" | the op that computes X
    fold: str                         # "norm" | "linear" | "explicit"
    params: list[str] = field(default_factory=list)  # norm: parameters divided by s
    producer: str | None = None       # linear: the layer whose rows take 1/s
    why: str = ""                     # why there is no exact fold

    def record(self) -> dict[str, Any]:
        d = {"layers": self.layers, "source": self.source, "fold": self.fold}
        d.update({"params": self.params} if self.params else {})
        d.update({"producer": self.producer} if self.producer else {})
        d.update({"why_explicit": self.why} if self.why else {})
        return d


# ------------------------------------------------------------------ finding groups
def _safe(graph: QuantGraph, n) -> bool:
    """A reshape-like op keeping the channel (last) dim (a pad only when it adds nothing)."""
    if not (n.kind == "other" and n.op in SAFE_BETWEEN and n.inputs and n.shape):
        return False
    src = graph.nodes[n.inputs[0]]
    return n.shape[-1:] == src.shape[-1:] and (n.op != "pad" or n.shape == src.shape)


def _back(graph: QuantGraph, idx: int) -> int:
    while _safe(graph, graph.nodes[idx]):
        idx = graph.nodes[idx].inputs[0]
    return idx


def _affine_params(graph: QuantGraph, idx: int, c: int) -> list[str] | None:
    """Parameters of the per-channel affine that computes node ``idx`` ([c] each), or None."""
    n = graph.nodes[idx]
    ins = [graph.nodes[i] for i in n.inputs]
    params = [p for p in ins if p.kind == "param" and p.op != "constant"]
    dyn = [p for p in ins if p.dynamic]
    ok = all(p.shape == [c] and p.users == 1 for p in params) and bool(params)
    if n.kind in NORM_KINDS:
        return [p.op for p in params] if ok else None
    if not (ok and len(params) == 1 and len(dyn) == 1 and len(ins) == 2):
        return None
    if n.op in MUL_OPS:
        return [params[0].op]
    if n.kind == "add" and dyn[0].users == 1:
        inner = _affine_params(graph, dyn[0].idx, c)
        return None if inner is None else inner + [params[0].op]
    return None


def _value_inputs(graph: QuantGraph, n) -> list[int]:
    """Inputs of ``n`` through which a per-channel scale passes linearly (module docstring)."""
    nodes = graph.nodes
    if n.kind == "other" and n.op in RELAYOUT and n.inputs:
        return n.inputs[:1]
    if n.kind == "other" and n.op == "cat":  # a KV cache's concat with an empty tensor
        full = [i for i in n.inputs if nodes[i].shape != [0]]
        return full if len(full) == 1 else []
    if n.kind == "sdpa":
        return n.inputs[2:3]
    dyn = [i for i in n.inputs if nodes[i].dynamic]
    if n.kind == "matmul" and len(dyn) == 2:
        return n.inputs[1:2]
    if n.kind == "other" and n.op in MUL_OPS and len(dyn) == 2 == len(n.inputs):
        return dyn
    return []


def _linear_source(graph: QuantGraph, idx: int, linear_at: dict[int, str]) -> int | None:
    if idx in linear_at:
        return idx
    found = {r for j in _value_inputs(graph, graph.nodes[idx])
             if (r := _linear_source(graph, j, linear_at)) is not None}
    return found.pop() if len(found) == 1 else None


def scale_groups(model: nn.Module, batches: list, layers: set[str]) -> list[ScaleGroup]:
    """The scale groups of the Linear layers ``layers`` of a prepared model (module
    docstring), in graph order of their first layer."""
    graph = recapture(model, batches[0])
    users, outputs = users_of(graph.nodes), set(graph.outputs)
    linear_at = {l["node"]: l["fqn"] for l in graph.layers
                 if isinstance(model.get_submodule(l["fqn"]), nn.Linear)}
    tied = _tied_params(model)
    by_x: dict[int, list[tuple[int, str]]] = {}
    for node, fqn in linear_at.items():
        mod = model.get_submodule(fqn)
        if (fqn in layers and id(mod.weight) not in tied
                and getattr(mod, "input_rot_a", None) is None):  # its columns are rotated
            by_x.setdefault(_back(graph, graph.nodes[node].inputs[0]), []).append((node, fqn))
    groups = []
    for x, members in sorted(by_x.items(), key=lambda kv: kv[1][0][0]):
        if any(len(model.get_submodule(f).weight.shape) != 2 for _, f in members):
            continue
        groups.append(_classify(model, graph, users, outputs, linear_at, x, members, batches))
    return groups


def _classify(model, graph, users, outputs, linear_at, x, members, batches) -> ScaleGroup:
    fqns = [f for _, f in sorted(members)]
    c = model.get_submodule(fqns[0]).in_features
    stops, returned = walk_forward(graph.nodes, users, x,
                                   lambda n, i: _safe(graph, n) and n.inputs[0] == i, outputs)
    exclusive = not returned and stops <= {n for n, _ in members}
    params = _affine_params(graph, x, c)
    p_node = _linear_source(graph, x, linear_at)
    if graph.nodes[x].kind in NORM_KINDS or params:
        source = "norm"
        if exclusive and params:
            return ScaleGroup(fqns, source, "norm", params=params)
        why = ("the norm output is also read by other ops" if not exclusive
               else "the norm has no elementwise affine weight")
    elif p_node is not None:
        source, prod = "linear", linear_at[p_node]
        why = _linear_fold_problem(model, graph, users, outputs, p_node, members, batches,
                                   exclusive)
        if not why:
            return ScaleGroup(fqns, source, "linear", producer=prod)
        why = f"{prod}: {why}"
    else:
        source = graph.nodes[x].op if graph.nodes[x].kind == "other" else graph.nodes[x].kind
        why = f"computed by {source}, which cannot absorb a per-channel scale"
    return ScaleGroup(fqns, source, "explicit", why=why)


def _linear_fold_problem(model, graph, users, outputs, p_node, members, batches,
                         exclusive) -> str:
    """'' when the group's 1/s folds exactly into the rows of the Linear at ``p_node``."""
    prod = graph.nodes[p_node].module
    c = model.get_submodule(members[0][1]).in_features
    p = model.get_submodule(prod)
    if not exclusive:
        return "its path output is also read by other ops"
    if p.out_features != c:
        return (f"{p.out_features} output channels reach {c} input channels "
                "(repeated, e.g. grouped-query attention)")
    stops, returned = walk_forward(graph.nodes, users, p_node,
                                   lambda n, i: i in _value_inputs(graph, n), outputs)
    if returned or stops != {n for n, _ in members}:
        return "its output is also read by other ops"
    if id(p.weight) in _tied_params(model):
        return "its weight is tied to another module"
    one = take(batches[0], torch.arange(1))  # a probe of one sample decides as well as many
    if not _probe_channels(model, prod, [f for _, f in members], one):
        return "channels do not map one to one (checked by a probe)"
    return ""


@torch.no_grad()
def _probe_channels(model: nn.Module, producer: str, readers: list[str], item: Any) -> bool:
    """Scaling ``producer``'s output channels by r scales every reader's input by r."""
    p = model.get_submodule(producer)
    r = 0.5 + 1.5 * torch.rand(p.out_features, generator=torch.Generator().manual_seed(0))

    def run(scale: bool) -> dict[str, Tensor]:
        got: dict[str, Tensor] = {}

        def pre(name):
            def hook(m, args):
                got[name] = args[0].detach().clone()
                if len(got) == len(readers):
                    raise _Stop
            return hook
        hooks = [model.get_submodule(f).register_forward_pre_hook(pre(f)) for f in readers]
        if scale:
            hooks.append(p.register_forward_hook(lambda m, a, out: out * r))
        try:
            with quantizers_off(model):
                call_model(model, item)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got

    base, scaled = run(False), run(True)
    return all(f in scaled and torch.allclose(scaled[f], base[f] * r, rtol=PROBE_RTOL,
                                              atol=PROBE_RTOL * float(base[f].abs().max()))
               for f in readers)


def _tied_params(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def block_steps(model: nn.Module, batches: list, groups: list[ScaleGroup]
                ) -> list[list[ScaleGroup]]:
    """The groups by residual block of the graph (the smallest block holding a group's first
    layer: attention, MLP), in graph order; a group outside every block is a step alone."""
    graph = recapture(model, batches[0])
    node = {l["fqn"]: l["node"] for l in graph.layers}
    blocks = sorted(graph.blocks, key=lambda b: len(b["layers"]))
    steps: dict[tuple, list[ScaleGroup]] = {}
    for g in groups:
        b = next((b for b in blocks if g.layers[0] in b["layers"]), None)
        key = ("block", b["add_node"]) if b is not None else ("layer", node[g.layers[0]])
        steps.setdefault(key, []).append(g)
    return sorted(steps.values(), key=lambda gs: node[gs[0].layers[0]])


def run_groups(model: nn.Module, steps: list[list[ScaleGroup]], make: Callable, batches: list,
               *, progress: bool = False, desc: str = "scales") -> dict[str, dict]:
    """Per step: one run of the calibration batches through the float model feeds the step's
    group solvers (``runner.layerwise.feed``: each forward stops after the step's last layer);
    then each solver searches and applies its scales, in graph order, and is freed. Later
    steps see the model as the earlier ones left it. Returns {first layer: statistics}."""
    out = {}
    with quantizers_off(model):
        for step in tqdm(steps, desc=desc, disable=not progress, leave=False):
            solvers = {g.layers[0]: make(g) for g in step}
            feed(model, solvers, batches)
            for f, solver in solvers.items():
                out[f] = solver.solve()
                solver.free()
    return out


def left_out(model: nn.Module, groups: list[ScaleGroup], layers: set[str]) -> dict[str, str]:
    """The quantized layers no group holds, with the reason."""
    held = {f for g in groups for f in g.layers}
    return {f: "not in a scale group (not a Linear, a tied weight, an input "
                "rotation, or outside the targets)"
            for f in sorted(layers - held)}


# ------------------------------------------------------------------ applying scales
@torch.no_grad()
def apply_scales(model: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """X ← X/s where X is produced (``group.fold``), W ← W·diag(s) for the group's layers."""
    s = s.detach().float()
    for f in group.layers:
        layer = model.get_submodule(f)
        layer.weight.mul_(s.to(layer.weight.dtype)[None, :])          # [out, in] · s over in
        if group.fold == "explicit":
            old = layer.input_scale
            set_input_scale(model, f, s if old is None else old * s)
    if group.fold == "norm":
        for name in group.params:
            model.get_parameter(name).div_(s)
    elif group.fold == "linear":
        p = model.get_submodule(group.producer)
        p.weight.div_(s[:, None])                                       # rows of P
        if p.bias is not None:
            p.bias.div_(s)


@torch.no_grad()
def float_output(model: nn.Module, item: Any) -> Tensor:
    """The model's first float output on the first sample of ``item``, quantizers off."""
    with quantizers_off(model):
        return first_float(call_model(model, take(item, torch.arange(1)))).detach().clone()


def relative_change(before: Tensor, after: Tensor) -> float:
    """max |after − before| / max |before|: 0 when a transform kept the float function."""
    return float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))


def count_folds(groups: dict[str, dict]) -> dict[str, int]:
    """How many groups took each fold."""
    out: dict[str, int] = {}
    for g in groups.values():
        out[g["fold"]] = out.get(g["fold"], 0) + 1
    return out


def set_input_scale(model: nn.Module, fqn: str, s: Tensor) -> None:
    """The layer divides its input by ``s``; recorded in the plan so ``load`` rebuilds it."""
    model.get_submodule(fqn).set_input_scale(s)
    getattr(model, META_ATTR)["plan"]["layers"][fqn]["input_scale"] = True


# ------------------------------------------------------------------ statistics and errors
class ChannelStats:
    """Per-channel max|x| and mean|x| of a layer input over all calibration tokens, plus a
    seeded uniform sample of ``max_tokens`` token rows (smallest random keys kept)."""

    def __init__(self, channels: int, max_tokens: int, seed: int):
        self.absmax = torch.zeros(channels)
        self.abssum = torch.zeros(channels, dtype=torch.float64)
        self.count = 0
        self.max_tokens = max_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.rows = torch.zeros(0, channels)
        self.keys = torch.zeros(0)

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()             # [tokens, C]
        a = rows.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.abssum += a.sum(0, dtype=torch.float64)
        self.count += len(rows)
        keys = torch.cat([self.keys, torch.rand(len(rows), generator=self.gen)])
        pool = torch.cat([self.rows, rows])
        keep = keys.argsort()[:self.max_tokens]
        self.rows, self.keys = pool[keep], keys[keep]

    @property
    def absmean(self) -> Tensor:
        return (self.abssum / max(1, self.count)).float()


def fake_weight(spec: QuantSpec, w: Tensor) -> Tensor:
    """``w`` fake-quantized on its own grid by ``spec`` (range from the spec's observer)."""
    q = Quantizer(spec)
    q.calibrate(w)
    return q.fake_quant(w)


def fake_input(spec: QuantSpec | None, x: Tensor) -> Tensor:
    """``x`` [tokens, C] fake-quantized by an activation spec calibrated on ``x``; None: x."""
    if spec is None:
        return x
    q = Quantizer(spec)
    q._observe(x)
    q.finish_observe()
    return q.fake_quant(x)


@torch.no_grad()
def group_error(x: Tensor, weights: list[Tensor], s: Tensor, w_specs: list[QuantSpec],
                a_spec: QuantSpec | None = None, refs: list[Tensor] | None = None) -> float:
    """Mean squared error of the group's outputs x Wᵀ when each layer computes with
    Q(W·diag(s)) on Q(x/s) (``a_spec`` None: x/s unquantized), over the token rows ``x``."""
    xs = fake_input(a_spec, x / s)
    err, n = 0.0, 0
    for k, (w, spec) in enumerate(zip(weights, w_specs)):
        ref = x @ w.T if refs is None else refs[k]                      # [tokens, out]
        out = xs @ fake_weight(spec, w * s[None, :]).T
        err += float((out - ref).pow(2).sum())
        n += ref.numel()
    return err / max(1, n)


def search(candidates: list[Any], loss: Callable[[Any], float]) -> tuple[Any, list[float]]:
    """The candidate with the least loss (the first on ties) and every loss."""
    losses = [loss(c) for c in candidates]
    return candidates[min(range(len(losses)), key=losses.__getitem__)], losses
