"""Graph queries and quantizer swaps shared by the transformer PTQ methods (PTQ4ViT, RepQ-ViT).

Everything is found from the QuantGraph, never from module names:

* post-softmax quantizers: the ``probs`` role of every SDPA site, and every operand of an
  explicit matmul site whose graph source is ``softmax``;
* post-GELU quantizers: the input quantizer of every layer whose graph source is ``gelu``;
* LayerNorm → Linear groups: walk back from each layer's input through reshape-like ops to a
  ``layer_norm`` node; its weight/bias parameter nodes name the affine parameters. A group is
  *exclusive* when every consumer of the LayerNorm output is one of those layers and the
  model does not return it (pre-LN transformers: yes; post-LN BERT, whose LN output also
  feeds the residual add or is the returned hidden state: no).

Swapping a quantizer for another kind also rewrites the plan stored on the model, so the
artifact rebuilds the same quantizer classes on load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..graph.capture import (PASSTHROUGH, QuantGraph, call_model, graph_of, users_of,
                             walk_forward)
from ..quant.functional import SITE_ROLES, FunctionalSites
from ..quant.kinds import make_quantizer
from ..quant.prepare import META_ATTR, SITES_ATTR, distinct, quantizers_off
from ..quant.quantizer import Mode, Quantizer

# reshape-like ops through which a per-channel affine map still commutes (shape-checked too)
SAFE_BETWEEN = PASSTHROUGH - {"cat", "mean", "adaptive_avg_pool2d", "avg_pool2d",
                              "max_pool2d"}


def recapture(model: nn.Module, example: Any) -> QuantGraph:
    """The QuantGraph of a prepared model (quantizers off, so they record nothing)."""
    with quantizers_off(model):
        return graph_of(model, example)


def sites_of(model: nn.Module) -> FunctionalSites | None:
    return getattr(model, SITES_ATTR, None)


def post_softmax_slots(model: nn.Module) -> list[tuple[str, int]]:
    """(site key, role index) of every quantizer that reads softmax output."""
    meta, sites = getattr(model, META_ATTR), sites_of(model)
    if sites is None:
        return []
    out = []
    for site in meta["graph"]["functional"]:
        if sites.site(site["key"]) is None:
            continue
        if site["kind"] == "sdpa":
            out.append((site["key"], SITE_ROLES["sdpa"].index("probs")))
        else:
            out += [(site["key"], i) for i, s in enumerate(site["sources"][:2])
                    if s == "softmax"]
    return out


def post_gelu_layers(model: nn.Module) -> list[str]:
    meta = getattr(model, META_ATTR)
    return [l["fqn"] for l in meta["graph"]["layers"] if l["source"] == "gelu"
            and (meta["plan"]["layers"].get(l["fqn"]) or {}).get("activations")]


def swap_site_quantizer(model: nn.Module, key: str, idx: int, kind: str | None = None,
                        **update: Any) -> Quantizer:
    """Replace one functional-site quantizer by one of another ``kind`` and/or other spec
    fields (``granularity=PerChannel(1)``, ``bits=4``), recorded in the plan's per-role specs
    so ``load`` rebuilds it."""
    sites, plan = sites_of(model), getattr(model, META_ATTR)["plan"]
    old = sites.site(key)[idx]
    if kind is not None:
        update["kind"] = kind
    spec = type(old.spec).model_validate({**old.spec.model_dump(), **update})
    new = make_quantizer(spec, seed=old.seed, max_samples=old.max_samples)
    sites.site(key)[idx] = new
    role = SITE_ROLES[plan["functional"][key]["kind"]][idx]
    plan["functional"][key].setdefault("roles", {})[role] = spec.model_dump(mode="json")
    return new


def swap_input_quantizer(model: nn.Module, fqn: str, kind: str) -> Quantizer:
    old = model.get_submodule(fqn).input_quantizer
    spec = old.spec.model_copy(update={"kind": kind})
    return set_input_quantizer(model, fqn, make_quantizer(spec, seed=old.seed,
                                                          max_samples=old.max_samples))


def set_input_quantizer(model: nn.Module, fqn: str, q: Quantizer) -> Quantizer:
    """Install ``q`` as the layer's input quantizer and record its spec in the plan."""
    model.get_submodule(fqn).input_quantizer = q
    getattr(model, META_ATTR)["plan"]["layers"][fqn]["activations"] = q.spec.model_dump(
        mode="json")
    return q


@torch.no_grad()
def observe_only(model: nn.Module, batches: list, quantizers: list[Quantizer]) -> None:
    """Calibrate ``quantizers`` on one float pass (every other quantizer off); a quantizer shared
    by several readers (q/k/v of one LayerNorm output) is listed once."""
    quantizers = distinct(quantizers)
    if not quantizers:
        return
    with quantizers_off(model):
        for q in quantizers:
            q.mode = Mode.OBSERVE
        for item in batches:
            call_model(model, item)
        for q in quantizers:
            q.finish_observe()
    for q in quantizers:
        q.mode = Mode.QUANT


@dataclass
class LNGroup:
    """One LayerNorm and the Linear layers that read its output."""

    weight: str                 # parameter names of the LN affine
    bias: str
    layers: list[str] = field(default_factory=list)
    consumers: set[str] | None = None  # fqns reading the LN output; None: a non-Linear does

    @property
    def exclusive(self) -> bool:
        """Every consumer of the LN output is one of ``layers`` (so the fold is exact)."""
        return self.consumers is not None and self.consumers <= set(self.layers)


def _safe(graph: QuantGraph, n) -> bool:
    """A reshape-like op that keeps the channel (last) dim and adds no values (a zero pad
    would not follow the reparameterised affine, so only a no-op pad is accepted)."""
    if not (n.kind == "other" and n.op in SAFE_BETWEEN and n.inputs):
        return False
    src = graph.nodes[n.inputs[0]]
    if not n.shape or n.shape[-1:] != src.shape[-1:]:
        return False
    return n.op != "pad" or n.shape == src.shape


def _walk_back_to_ln(graph: QuantGraph, idx: int, channels: int) -> int | None:
    n = graph.nodes[idx]
    while _safe(graph, n):
        n = graph.nodes[n.inputs[0]]
    return n.idx if n.kind == "layer_norm" and n.shape[-1:] == [channels] else None


def _reshaped(graph: QuantGraph, users: dict, start: int) -> tuple[set[int], bool]:
    """(first non-reshape consumers of node ``start`` through SAFE_BETWEEN ops, whether
    ``start`` or a reshape-like view of it is a model output)."""
    return walk_forward(graph.nodes, users, start,
                        lambda n, i: _safe(graph, n) and n.inputs[0] == i, set(graph.outputs))


def ln_linear_groups(model: nn.Module, graph: QuantGraph) -> list[LNGroup]:
    """LayerNorm → Linear groups (see module docstring)."""
    users = users_of(graph.nodes)
    linear_node = {l["node"]: l["fqn"] for l in graph.layers
                   if isinstance(model.get_submodule(l["fqn"]), nn.Linear)}
    groups: dict[int, LNGroup] = {}
    for layer in graph.layers:
        if layer["node"] not in linear_node or layer["source"] != "layer_norm":
            continue
        lin = model.get_submodule(layer["fqn"])
        node = graph.nodes[layer["node"]]
        ln = _walk_back_to_ln(graph, node.inputs[0], lin.in_features)
        if ln is None:
            continue
        ln_node = graph.nodes[ln]
        params = [graph.nodes[i] for i in ln_node.inputs[1:3]]
        if len(params) != 2 or any(p.kind != "param" or p.op == "constant" for p in params):
            continue  # LayerNorm without affine parameters: nothing to fold into
        if ln not in groups:
            cons, returned = _reshaped(graph, users, ln)
            fqns = {linear_node.get(c) for c in cons}
            if returned:
                fqns.add(None)  # the model returns it: a fold would change the output
            groups[ln] = LNGroup(params[0].op, params[1].op,
                                 consumers=None if None in fqns else fqns)
        groups[ln].layers.append(layer["fqn"])
    return list(groups.values())


def first_float(out: Any) -> torch.Tensor:
    """The model's prediction: its first floating-point output tensor (logits for a
    classifier, ``last_hidden_state`` for an HF encoder)."""
    for t in tree_flatten(out)[0] if not hasattr(out, "to_tuple") else out.to_tuple():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise TypeError("the model returned no floating-point tensor to calibrate against")
