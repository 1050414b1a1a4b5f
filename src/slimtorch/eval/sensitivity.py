"""Per-layer sensitivity to weight quantization, and cheap proxies ranked against it.

For each candidate weight bit width b the model is prepared with the recipe's quantizers
(``quant.prepare``: BN folded, the recipe's weight spec at b bits, its activation spec);
activation ranges are calibrated once on the float weights, so they are the same for every b
("activations fixed"). Then, for each layer ℓ, only ℓ's weight quantizer is switched on (plus
every activation quantizer) and the model runs on *held* calibration images (never the ones
the ranges came from). Measured (``true``) sensitivity of (ℓ, b):

* ``kl``: mean KL(softmax(float) ‖ softmax(quantized)) minus the same KL with all weights float
  (the activations' share), the quantity the allocation minimises;
* ``agreement_drop``: top-1 agreement with the float model lost, in % points (the task metric
  on held data; no labels needed).

Proxies, each computed without running the model once per (ℓ, b):

* ``hawq`` (HAWQ-v2, Dong et al. 2020): ½·Tr(H_ℓ)/n_ℓ · ‖Q_b(W_ℓ) − W_ℓ‖² (the mean Hessian trace
  times the weight noise; ½ makes it the second-order Taylor estimate of the KL increase). H is the Hessian of the loss
  KL(softmax(f_float) ‖ softmax(f_W)) at the float weights (the paper uses cross-entropy with
  labels; calibration data has none, and at W_float this KL has zero gradient and a PSD
  Hessian); Tr(H_ℓ) by Hutchinson: E_v[vᵀH_ℓℓv], v Rademacher on ℓ's weights only, one
  Hessian-vector product per layer and probe (each estimate is ≥ 0; probing all layers at once
  adds cross terms that vanish only in expectation and made small layers' traces negative).
* ``sqnr``: the layer's own output noise, 10^(−SQNR/10) = ‖ℓ(x; Q_b(W)) − ℓ(x; W)‖² / ‖ℓ(x; W)‖²
  on the float model's inputs of ℓ (one pass, all layers and bit widths).
* ``coding_length``: Attention Round's lossy coding length L(W_ℓ) (``quant.allocate``) with the
  rate–distortion model L·2^(−2b) (our choice, see docs/mixed-precision.md).

Per block: the same ΔKL with the weights of all layers of one reconstruction unit quantized
(``blocks``: residual blocks and module groups of ``runner.units.partition``), next to the sum
of its layers' own ΔKL — how far per-layer sensitivities add up.

``spearman`` holds the rank correlation of each proxy with ``kl``, per bit width (across layers)
and pooled over all (layer, bit width) pairs.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algorithms.vit_sites import observe_only
from ..data.calibration import calibration_batches
from ..errors import SlimtorchError
from ..graph.capture import call_model
from ..quant.allocate import EPS_CODING, coding_length
from ..quant.prepare import activation_quantizers, prepare, quant_layers, quant_state
from ..quant.quantizer import Mode
from ..recipe import Recipe, resolve_recipe

PROXIES = ("hawq", "sqnr", "coding_length")


def sensitivity_recipe(recipe: Recipe, bits: int) -> Recipe:
    """``recipe`` with every weight at ``bits`` (first/last/override weight bits dropped; their
    activation bits kept) and RTN only: the one-layer-at-a-time measurement model."""
    if recipe.weights is None:
        raise SlimtorchError(f"recipe {recipe.name!r} keeps weights float: sensitivity to weight "
                             "bits needs a recipe with `weights:` (e.g. w4a8)")
    d = recipe.to_dict()

    def acts_only(ov):
        return None if ov is None or ov.get("activations") is None else {
            "activations": ov["activations"]}
    d.update(name=f"{recipe.name}-sens-w{bits}", methods=["rtn"],
             weights={**d["weights"], "bits": bits},
             first_layer=acts_only(d["first_layer"]), last_layer=acts_only(d["last_layer"]),
             overrides={k: acts_only(v) for k, v in d["overrides"].items() if v is not None})
    return Recipe.from_dict(d, source=d["name"])


def _prepared(model: nn.Module, recipe: Recipe, batches: list, seed: int) -> nn.Module:
    """A prepared copy: weight ranges from the weights, activation ranges observed with the
    float weights (so every bit width sees the same activation grid)."""
    qm = copy.deepcopy(model).eval()
    prepare(qm, recipe, batches[0], seed=seed)
    for _, m in quant_layers(qm):
        m.calibrate_weight()
    observe_only(qm, batches, activation_quantizers(qm))
    return qm


def _logits(model: nn.Module, batches: list) -> Tensor:
    with torch.no_grad():
        return torch.cat([call_model(model, b).float() for b in batches])  # [N, classes]


def _kl(ref: Tensor, test: Tensor) -> float:
    lp, lq = F.log_softmax(ref, 1), F.log_softmax(test, 1)
    return max(0.0, (lp.exp() * (lp - lq)).sum(1).mean().item())


def _agreement(ref: Tensor, test: Tensor) -> float:
    return 100.0 * (ref.argmax(1) == test.argmax(1)).float().mean().item()


def _only(model: nn.Module, fqns: "set[str] | frozenset[str]") -> None:
    """Weight quantizers of the layers ``fqns`` on, every other weight quantizer off."""
    for f, m in quant_layers(model):
        if m.weight_quantizer is not None:
            m.weight_quantizer.mode = Mode.QUANT if f in fqns else Mode.OFF


def measured(models: dict[int, nn.Module], units: dict[str, list[str]], held: list,
             ref: Tensor) -> tuple[dict, dict]:
    """(baseline {kl, agreement}, {unit: {b: {kl, agreement_drop}}}) with the weights of each
    unit's layers (one layer, or a block's) quantized at b — see module docstring."""
    any_model = next(iter(models.values()))
    _only(any_model, frozenset())
    base_out = _logits(any_model, held)
    base = {"kl": _kl(ref, base_out), "agreement": _agreement(ref, base_out)}
    out: dict[str, dict] = {u: {} for u in units}
    for b, qm in models.items():
        for u, fqns in units.items():
            _only(qm, set(fqns))
            y = _logits(qm, held)
            out[u][b] = {"kl": _kl(ref, y) - base["kl"],
                         "agreement_drop": base["agreement"] - _agreement(ref, y)}
        _only(qm, frozenset())
    return base, out


def _weight_noise(models: dict[int, nn.Module], fqn: str) -> dict[int, Tensor]:
    """Q_b(W) − W of layer ``fqn`` for each bit width."""
    out = {}
    for b, qm in models.items():
        m = qm.get_submodule(fqn)
        with torch.no_grad():
            out[b] = m.weight_quantizer.fake_quant(m.weight) - m.weight
    return out


def _apply_weight(m: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """The layer's linear map of ``x`` with weight ``w`` and no bias."""
    if isinstance(m, nn.Linear):
        return F.linear(x, w)
    return m._conv_forward(x, w, None)


def sqnr_proxy(model: nn.Module, noise: dict[str, dict[int, Tensor]], batches: list
               ) -> dict[str, dict[int, float]]:
    """Noise-to-signal power of each layer's own output, 10^(−SQNR/10), on float inputs."""
    sig = {f: 0.0 for f in noise}
    err = {f: {b: 0.0 for b in noise[f]} for f in noise}

    def hook(f):
        def fn(m, args, y):
            x = m.quantized_input(args[0])  # input transform only: quantizers are off
            sig[f] += (y - (0 if m.bias is None else _bias(m, y))).square().sum().item()
            for b, dw in noise[f].items():
                err[f][b] += _apply_weight(m, x, dw).square().sum().item()
        return fn
    mods = dict(quant_layers(model))
    hooks = [mods[f].register_forward_hook(hook(f)) for f in noise]
    try:
        with torch.no_grad(), quant_state(model, weights=False, acts=False):
            for item in batches:
                call_model(model, item)
    finally:
        for h in hooks:
            h.remove()
    return {f: {b: e / max(sig[f], 1e-30) for b, e in err[f].items()} for f in noise}


def _bias(m: nn.Module, y: Tensor) -> Tensor:
    shape = [1] * y.dim()
    shape[1 if not isinstance(m, nn.Linear) else -1] = -1
    return m.bias.reshape(shape)


def hessian_traces(model: nn.Module, layers: list[str], batches: list, probes: int,
                   seed: int) -> dict[str, float]:
    """Hutchinson estimate of Tr(H_ℓ) of KL(float ‖ model) at the float weights, per layer."""
    mods = dict(quant_layers(model))
    params = [mods[f].weight for f in layers]
    saved = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    tr = {f: 0.0 for f in layers}
    n = sum(len(b) for b in batches)
    try:
        for p in params:
            p.requires_grad_(True)
        with quant_state(model, weights=False, acts=False), torch.enable_grad():
            for item in batches:
                with torch.no_grad():
                    target = F.softmax(call_model(model, item).float(), 1)
                loss = F.kl_div(F.log_softmax(call_model(model, item).float(), 1), target,
                                reduction="batchmean") * len(item) / n
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for f, g, p in zip(layers, grads, params):
                    for _ in range(probes):
                        v = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
                        (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
                        tr[f] += (v * hv).sum().item() / probes
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    return tr


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's ρ: Pearson correlation of the ranks (ties get their mean rank)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length ≥ 2")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / den if den > 0 else float("nan")


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def rank_correlations(layers: list[dict], bits: list[int]) -> dict[str, dict[str, float]]:
    """ρ of each proxy (and of agreement_drop) with ``kl``: per bit width and pooled."""
    out: dict[str, dict[str, float]] = {}
    for name in (*PROXIES, "agreement_drop"):
        row = {}
        for b in bits:
            row[f"w{b}"] = spearman([l["kl"][b] for l in layers], [l[name][b] for l in layers])
        row["pooled"] = spearman([l["kl"][b] for l in layers for b in bits],
                                 [l[name][b] for l in layers for b in bits])
        out[name] = {k: round(v, 4) for k, v in row.items()}
    return out


def layer_sensitivity(model: nn.Module, calib_data: Any, held_data: Any, *,
                      recipe: Recipe | str = "w4a8", bits=(2, 3, 4, 6, 8), seed: int = 0,
                      probes: int = 4, hessian_samples: int = 256) -> dict[str, Any]:
    """Measure every weight-quantized layer's sensitivity at each of ``bits`` and the proxies
    (module docstring). ``calib_data`` sets the ranges, ``held_data`` (disjoint) is measured
    on; both take any form ``quantize`` takes. Returns plain data (``sensitivity.json``)."""
    base = resolve_recipe(recipe)
    bits = sorted(set(int(b) for b in bits))
    if not bits:
        raise SlimtorchError("give at least one candidate bit width, e.g. --bits 2,4,8")
    calib = calibration_batches(calib_data, base.calib.batch_size)
    held = calibration_batches(held_data, base.calib.batch_size)
    models = {b: _prepared(model, sensitivity_recipe(base, b), calib, seed) for b in bits}
    any_m = models[bits[0]]
    layers = [f for f, m in quant_layers(any_m) if m.weight_quantizer is not None]
    if not layers:
        raise SlimtorchError(f"recipe {base.name!r} quantizes no layer weights of this model")
    with torch.no_grad(), quant_state(any_m, weights=False, acts=False):
        ref = _logits(any_m, held)  # the float model (BN folded), on the held images
    baseline, true = measured(models, {f: [f] for f in layers}, held, ref)
    noise = {f: _weight_noise(models, f) for f in layers}
    sq = sqnr_proxy(any_m, noise, held)
    h_batches = [torch.cat(calibration_batches(calib_data, base.calib.batch_size,
                                               max_samples=hessian_samples))[:hessian_samples]]
    traces = hessian_traces(any_m, layers, h_batches, probes, seed)
    mods = dict(quant_layers(any_m))
    rows = []
    for f in layers:
        w = mods[f].weight.detach()
        n = w.numel()
        cl = coding_length(w, EPS_CODING * w.square().mean().sqrt().item())
        rows.append({
            "fqn": f, "type": type(mods[f]).__name__.removeprefix("Quant"), "params": n,
            "hessian_trace": traces[f], "coding_length": {b: cl * 2.0 ** (-2 * b) for b in bits},
            "coding_length_bits": cl,
            "kl": {b: true[f][b]["kl"] for b in bits},
            "agreement_drop": {b: true[f][b]["agreement_drop"] for b in bits},
            "hawq": {b: 0.5 * traces[f] / n * noise[f][b].square().sum().item() for b in bits},
            "sqnr": {b: sq[f][b] for b in bits},
            "sqnr_db": {b: -10 * math.log10(max(sq[f][b], 1e-30)) for b in bits}})
    blocks = block_sensitivity(models, any_m, calib, held, ref, baseline, rows)
    return {"recipe": base.to_dict(), "bits": bits, "seed": seed, "probes": probes,
            "calib_samples": sum(len(b) for b in calib), "held_samples": len(ref),
            "hessian_samples": sum(len(b) for b in h_batches), "baseline": baseline,
            "layers": rows, "blocks": blocks, "spearman": rank_correlations(rows, bits)}


def block_sensitivity(models: dict[int, nn.Module], any_m: nn.Module, calib: list, held: list,
                      ref: Tensor, baseline: dict, layers: list[dict]) -> list[dict]:
    """ΔKL with all weights of one reconstruction unit of several layers (a residual block, a
    group: ``runner.units.partition``, the units BRECQ-style methods reconstruct) at b bits,
    beside the sum of its layers' own ΔKL (their interaction: > 1 compounds, < 1 cancels)."""
    from ..runner.units import partition
    with torch.no_grad():
        units = [u for u in partition(any_m, calib[0]) if len(u.layers) > 1]
    if not units:
        return []
    _, true = measured(models, {u.name: u.layers for u in units}, held, ref)
    by = {l["fqn"]: l for l in layers}
    return [{"name": u.name, "kind": u.kind, "layers": u.layers,
             "params": sum(by[f]["params"] for f in u.layers if f in by),
             "kl": {b: v["kl"] for b, v in true[u.name].items()},
             "agreement_drop": {b: v["agreement_drop"] for b, v in true[u.name].items()},
             "sum_of_layers_kl": {b: sum(by[f]["kl"][b] for f in u.layers if f in by)
                                  for b in true[u.name]}} for u in units]
