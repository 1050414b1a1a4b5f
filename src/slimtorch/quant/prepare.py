"""Prepare a model for quantization: rewrite, capture, plan, attach quantizers, calibrate, freeze.

The *plan* is plain data (``{"layers": {fqn: {"weights": spec|None, "activations":
spec|None}}, "functional": {key: {"kind", "spec"}}, "shared": {reader: owner}}``) so that
``load`` can replay it on a fresh copy of the architecture.

One tensor, one quantizer: every reader of the same activation tensor with the same spec (the
first conv of a residual block and its downsample shortcut, the q/k/v projections of one
LayerNorm output, a residual add's skip operand) uses the quantizer of the first reader
(``plan["shared"]``; readers are layer fqns or ``"site key#role"``). The readers then agree on
the grid, as an integer engine needs (one QuantizeLinear per tensor).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RecipeError
from ..graph.capture import VIEWS, QuantGraph, call_model, capture, remember
from ..graph.rewrite import decompose_attention, fold_batchnorm, set_submodule
from ..graph.split_concat import concat_readers, split_concat
from ..recipe import Recipe, match_override
from .functional import SITE_ROLES, FunctionalSites
from .granularity import PerChannel, PerGroup, PerTensor
from .modules import QuantLayerMixin, qmodule_class
from .quantizer import Mode, Quantizer
from .spec import LayerOverride, QuantSpec

SITES_ATTR = "slimtorch_functional"
META_ATTR = "_slimtorch_meta"


def _with_bits(spec: QuantSpec | None, ov: LayerOverride | None, part: str) -> QuantSpec | None:
    if ov is None:
        return None  # the whole layer stays float
    if part not in ov.model_fields_set:
        return spec
    bits = getattr(ov, part)
    if bits is None or spec is None:
        return None
    return spec.model_copy(update={"bits": bits})


def make_plan(graph: QuantGraph, recipe: Recipe) -> dict[str, Any]:
    """Decide the weight/activation spec of every layer and functional site. A recipe with a
    method that masks weights (``MethodConfig.masks_weights``: the sparsity methods) plans
    every Conv/Linear, a layer it does not quantize with no quantizers, so each can hold a
    mask."""
    layers: dict[str, dict] = {}
    compute = [l["fqn"] for l in graph.layers if l["type"] != "Embedding"]
    first, last = (compute[0], compute[-1]) if compute else (None, None)
    masked = recipe.masks_weights
    for layer in graph.layers:
        w, a = recipe.weights, recipe.activations
        if layer["type"] == "Embedding":  # weight-only; the input is indices
            if not recipe.quantize_embeddings or w is None:
                continue
            w, a = w.model_copy(update={"granularity": PerChannel(0)}), None
        for is_edge, ov in ((layer["fqn"] == first, recipe.first_layer),
                            (layer["fqn"] == last, recipe.last_layer)):
            if is_edge and ov is not None:
                w, a = _with_bits(w, ov, "weights"), _with_bits(a, ov, "activations")
        hit, ov = match_override(recipe.overrides, layer["fqn"], layer["type"],
                                 layer.get("depthwise", False))
        if hit:
            w, a = _with_bits(w, ov, "weights"), _with_bits(a, ov, "activations")
        if w is not None or a is not None or (masked and layer["type"] != "Embedding"):
            layers[layer["fqn"]] = {"weights": _dump(w), "activations": _dump(a)}
    functional: dict[str, dict] = {}
    if recipe.activations is not None:
        for site in graph.functional:
            if not (recipe.quantize_adds if site["kind"] == "add" else recipe.quantize_matmuls):
                continue
            a = recipe.activations.model_copy(update={"granularity": PerTensor()})
            hit, ov = match_override(recipe.overrides, site["key"], site["kind"])
            if hit:
                a = _with_bits(a, ov, "activations")
            if a is not None:
                functional[site["key"]] = {"kind": site["kind"], "spec": _dump(a)}
    plan = {"layers": layers, "functional": functional}
    plan["shared"] = shared_readers(graph, plan)
    return plan


# which input of the site's call each role quantizes (sdpa's "probs" is computed inside)
_ROLE_INPUT = {"matmul": {"a": 0, "b": 1}, "add": {"a": 0, "b": 1},
               "sdpa": {"q": 0, "k": 1, "v": 2}}


def _act_readers(graph: QuantGraph, plan: dict
                 ) -> list[tuple[int, str, tuple[int, int], dict]]:
    """(reading node, reader ref, (tensor node, which of its outputs), spec) of every planned
    activation quantizer."""
    out = []
    for layer in graph.layers:
        spec = _spec_of(plan, layer["fqn"])
        node = graph.nodes[layer["node"]]
        if spec is not None:
            out.append((layer["node"], layer["fqn"], (node.inputs[0], node.parts[0]), spec))
    for site in graph.functional:
        if site["key"] not in plan["functional"]:
            continue
        node = graph.nodes[site["node"]]
        for role, j in _ROLE_INPUT[site["kind"]].items():
            if j < len(node.inputs):
                out.append((site["node"], f"{site['key']}#{role}",
                            (node.inputs[j], node.parts[j]),
                            _spec_of(plan, f"{site['key']}#{role}")))
    return sorted(out, key=lambda r: r[0])


def _value_of(graph: QuantGraph, tensor: tuple[int, int]) -> tuple[int, int]:
    """The (node, output) whose values a reader's input shows, through pure re-layouts: two
    outputs of one split are different values."""
    idx, part = tensor
    while graph.nodes[idx].kind == "other" and graph.nodes[idx].op in VIEWS \
            and graph.nodes[idx].inputs:
        idx, part = graph.nodes[idx].inputs[0], graph.nodes[idx].parts[0]
    return idx, part


def shared_readers(graph: QuantGraph, plan: dict) -> dict[str, str]:
    """{reader: owner} for readers of one tensor with one spec (owner: the first reader)."""
    owners: dict[tuple, str] = {}
    shared = {}
    for _, ref, tensor, spec in _act_readers(graph, plan):
        per_tensor = spec.get("granularity") == "per_tensor"
        key = (_value_of(graph, tensor) if per_tensor else tensor,
               json.dumps(spec, sort_keys=True))
        if key in owners:
            shared[ref] = owners[key]
        else:
            owners[key] = ref
    return shared


def _spec_of(plan: dict, ref: str) -> dict | None:
    """Planned activation spec of a reader (layer fqn or ``"key#role"``)."""
    if "#" not in ref:
        return (plan["layers"].get(ref) or {}).get("activations")
    key, role = ref.rsplit("#", 1)
    site = plan["functional"].get(key)
    return None if site is None else site.get("roles", {}).get(role, site["spec"])


def _act_slot(model: nn.Module, plan: dict, ref: str) -> tuple[nn.Module, str]:
    """(container, attribute) holding the activation quantizer of a reader."""
    if "#" not in ref:
        return model.get_submodule(ref), "input_quantizer"
    key, role = ref.rsplit("#", 1)
    roles = SITE_ROLES[plan["functional"][key]["kind"]]
    return getattr(model, SITES_ATTR).site(key), str(roles.index(role))


def share_quantizers(model: nn.Module, plan: dict) -> None:
    """Point every reader in ``plan["shared"]`` at its owner's quantizer (same spec only)."""
    for reader, owner in plan.get("shared", {}).items():
        if _spec_of(plan, reader) != _spec_of(plan, owner):
            continue  # a method changed one reader's quantizer kind: keep them apart
        src, src_attr = _act_slot(model, plan, owner)
        dst, dst_attr = _act_slot(model, plan, reader)
        setattr(dst, dst_attr, getattr(src, src_attr))


def sync_shared(model: nn.Module, plan: dict) -> None:
    """Keep in ``plan["shared"]`` only the readers that still hold their owner's quantizer: a
    method that swaps one reader's quantizer (RepQ-ViT's reparameterising input quantizers)
    un-shares it, and ``load`` must rebuild exactly that."""
    plan["shared"] = {r: o for r, o in plan.get("shared", {}).items()
                      if getattr(*_act_slot(model, plan, r)) is getattr(*_act_slot(model, plan, o))}


def _dump(spec: QuantSpec | None) -> dict | None:
    return None if spec is None else spec.model_dump(mode="json")


def _load(spec: dict | None) -> QuantSpec | None:
    return None if spec is None else QuantSpec.model_validate(spec)


def attach(model: nn.Module, plan: dict[str, Any], *, seed: int = 0,
           max_samples: int = 1 << 18) -> None:
    """Swap planned layers for their quantized twins and add functional-site quantizers."""
    for i, (fqn, specs) in enumerate(plan["layers"].items()):
        mod = model.get_submodule(fqn)
        qcls = qmodule_class(mod)
        if qcls is None:
            raise TypeError(f"layer {fqn!r} of type {type(mod).__name__} has no quantized twin")
        w_spec = _load(specs["weights"])
        _check_groups(fqn, mod, w_spec)
        qmod = qcls.from_module(mod, w_spec, _load(specs["activations"]),
                                seed=seed * 1_000_003 + 10 * i, max_samples=max_samples)
        if specs.get("input_scale"):  # a channel-scaling method's explicit x/s (load fills it)
            qmod.set_input_scale(torch.ones(mod.weight.shape[1]))
        if specs.get("input_rotation"):  # rotate's online Hadamard [a, b] (load fills it)
            a, b = specs["input_rotation"]
            qmod.set_input_rotation(torch.eye(a), torch.eye(b))
        set_submodule(model, fqn, qmod)
    sites = FunctionalSites()
    for j, (key, site) in enumerate(plan["functional"].items()):
        roles = {r: _load(s) for r, s in site.get("roles", {}).items()}  # per-role kinds
        sites.add_site(key, site["kind"], _load(site["spec"]),
                       seed=seed * 1_000_003 + 7919 + 10 * j, max_samples=max_samples,
                       overrides=roles)
    if len(sites.sites):
        model.add_module(SITES_ATTR, sites)
    share_quantizers(model, plan)
    if len(sites.sites):
        sites.install(model)


def _check_groups(fqn: str, mod: nn.Module, spec: QuantSpec | None) -> None:
    """A per-group weight spec must divide every row of the layer's weight."""
    if spec is None or not isinstance(spec.gran, PerGroup):
        return
    n = mod.weight[0].numel()
    if n % spec.gran.size:
        divisors = [d for d in (128, 64, 32, 16, 8) if n % d == 0]
        raise RecipeError(
            f"weights granularity per_group({spec.gran.size}) does not divide the {n} input "
            f"features of layer {fqn!r}: use a group size that divides {n}"
            + (f" (e.g. per_group({divisors[0]}))" if divisors else "")
            + ", per_channel, or an override that keeps this layer at another setting")


def quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLayerMixin]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin))


def distinct(quantizers: Iterable[Quantizer]) -> list[Quantizer]:
    """Each quantizer once, in order (a shared one is read by several layers/sites)."""
    return list({id(q): q for q in quantizers}.values())


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    """Every activation quantizer once (a shared one is read by several layers/sites)."""
    out = []
    for _, m in quant_layers(model):
        if m.input_quantizer is not None:
            out.append(m.input_quantizer)
    sites = getattr(model, SITES_ATTR, None)
    if sites is not None:
        out += [q for qs in sites.sites.values() for q in qs]
    return distinct(out)


@contextmanager
def quant_state(model: nn.Module, *, weights: bool, acts: bool) -> Iterator[None]:
    """Weight / activation fake-quantization switched on or off model-wide inside the block
    (frozen layers hold their quantized weights and are left alone); modes restored after."""
    ws = [m.weight_quantizer for _, m in quant_layers(model)
          if m.weight_quantizer is not None and not m.frozen]
    acts_q = activation_quantizers(model)
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


def quantizers_off(model: nn.Module):
    """The float model: every quantizer pass-through inside the block."""
    return quant_state(model, weights=False, acts=False)


def set_activation_mode(model: nn.Module, mode: Mode) -> None:
    """Model-wide switch of all activation quantizers (off / observe / quant)."""
    for q in activation_quantizers(model):
        q.mode = mode


def prepare(model: nn.Module, recipe: Recipe, example: Any, *, seed: int = 0
            ) -> dict[str, Any]:
    """Rewrite the model in place and attach quantizers per the recipe. Returns metadata."""
    decomposed = decompose_attention(model)
    graph = capture(model, example)
    folds = graph.bn_folds if recipe.fold_bn else []
    if folds:
        fold_batchnorm(model, folds)
        graph = capture(model, example)
    splits = []
    if recipe.split_concat:  # Q-Diffusion's shortcut splitting (graph.split_concat)
        splits = concat_readers(graph, model)
        if splits:
            split_concat(model, splits)
            graph = capture(model, example)
    plan = make_plan(graph, recipe)
    mixed = None
    if recipe.mixed is not None:  # weight bits per layer from the weights (coding length)
        from .allocate import coding_length_recipe
        recipe, mixed = coding_length_recipe(model, plan, recipe)
        plan = make_plan(graph, recipe)
    attach(model, plan, seed=seed, max_samples=recipe.calib.max_samples_per_quantizer)
    remember(model, graph)  # the methods query this graph instead of capturing again
    meta = {"recipe": recipe.to_dict(), "graph": graph.describe(), "plan": plan,
            "bn_folds": [list(p) for p in folds], "decomposed": decomposed, "seed": seed}
    if splits:
        meta["split_concat"] = splits
    if mixed is not None:
        meta["mixed"] = mixed
    setattr(model, META_ATTR, meta)
    return meta


@torch.no_grad()
def calibrate(model: nn.Module, batches: list, *, progress: bool = False) -> None:
    """Weights from themselves; activations from one observing pass over the batches."""
    for _, m in quant_layers(model):
        m.calibrate_weight()
    acts = activation_quantizers(model)
    if not acts:
        return
    set_activation_mode(model, Mode.OBSERVE)
    for item in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
        call_model(model, item)
    for q in acts:
        q.finish_observe()


def freeze(model: nn.Module) -> None:
    for _, m in quant_layers(model):
        m.freeze()
