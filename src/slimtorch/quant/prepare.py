"""Prepare a model for quantization: rewrite, capture, plan, attach quantizers, calibrate, freeze.

The *plan* is plain data (``{"layers": {fqn: {"weights": spec|None, "activations":
spec|None}}, "functional": {key: {"kind", "spec"}}}``) so that ``load`` can replay it on a fresh
copy of the architecture.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..graph.capture import QuantGraph, call_model, capture
from ..graph.rewrite import decompose_attention, fold_batchnorm, set_submodule
from ..recipe import LayerOverride, QuantSpec, Recipe, match_override
from .functional import FunctionalSites
from .granularity import PerChannel, PerTensor
from .modules import QuantLayerMixin, qmodule_class
from .quantizer import Mode, Quantizer

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
    """Decide the weight/activation spec of every layer and functional site."""
    layers: dict[str, dict] = {}
    compute = [l["fqn"] for l in graph.layers if l["type"] != "Embedding"]
    first, last = (compute[0], compute[-1]) if compute else (None, None)
    for layer in graph.layers:
        w, a = recipe.weights, recipe.activations
        if layer["type"] == "Embedding":  # weight-only; the input is indices
            if not recipe.quantize_embeddings:
                continue
            w, a = w.model_copy(update={"granularity": PerChannel(0)}), None
        for is_edge, ov in ((layer["fqn"] == first, recipe.first_layer),
                            (layer["fqn"] == last, recipe.last_layer)):
            if is_edge and ov is not None:
                w, a = _with_bits(w, ov, "weights"), _with_bits(a, ov, "activations")
        hit, ov = match_override(recipe.overrides, layer["fqn"], layer["type"])
        if hit:
            w, a = _with_bits(w, ov, "weights"), _with_bits(a, ov, "activations")
        if w is not None or a is not None:
            layers[layer["fqn"]] = {"weights": _dump(w), "activations": _dump(a)}
    functional: dict[str, dict] = {}
    if recipe.quantize_matmuls and recipe.activations is not None:
        for site in graph.functional:
            a = recipe.activations.model_copy(update={"granularity": PerTensor()})
            hit, ov = match_override(recipe.overrides, site["key"], site["kind"])
            if hit:
                a = _with_bits(a, ov, "activations")
            if a is not None:
                functional[site["key"]] = {"kind": site["kind"], "spec": _dump(a)}
    return {"layers": layers, "functional": functional}


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
        qmod = qcls.from_module(mod, _load(specs["weights"]), _load(specs["activations"]),
                                seed=seed * 1_000_003 + 10 * i, max_samples=max_samples)
        set_submodule(model, fqn, qmod)
    sites = FunctionalSites()
    for j, (key, site) in enumerate(plan["functional"].items()):
        roles = {r: _load(s) for r, s in site.get("roles", {}).items()}  # per-role kinds
        sites.add_site(key, site["kind"], _load(site["spec"]),
                       seed=seed * 1_000_003 + 7919 + 10 * j, max_samples=max_samples,
                       overrides=roles)
    if len(sites.sites):
        model.add_module(SITES_ATTR, sites)
        sites.install(model)


def quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLayerMixin]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin))


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    out = []
    for _, m in quant_layers(model):
        if m.input_quantizer is not None:
            out.append(m.input_quantizer)
    sites = getattr(model, SITES_ATTR, None)
    if sites is not None:
        out += [q for qs in sites.sites.values() for q in qs]
    return out


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
    plan = make_plan(graph, recipe)
    attach(model, plan, seed=seed, max_samples=recipe.calib.max_samples_per_quantizer)
    meta = {"recipe": recipe.to_dict(), "graph": graph.describe(), "plan": plan,
            "bn_folds": [list(p) for p in folds], "decomposed": decomposed, "seed": seed}
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
