"""Self-check of a quantized model against its float model: where did it break?

On one batch of inputs, the float model and the quantized model run side by side. For every
quantized layer (Conv/Linear/Embedding twin) two signal-to-quantization-noise ratios are measured:

* **cumulative SQNR**: the layer's output in the quantized model against the same layer's output
  in the float model — the error of everything up to and including this layer;
* **own SQNR**: this layer alone, fed the float model's input to it — its own quantization error.

    SQNR(x, y) = 10·log10( ‖x‖² / ‖x − y‖² )  dB   (∞ when y == x)

The float reference is a copy of the float model with the same exact rewrites the quantized model
went through (attention decomposition, BatchNorm folding), so every quantized layer has a float
twin with the same name computing the same float function. A cumulative SQNR that collapses at
one layer while the layers before it are fine names the place to look.

The check holds every quantized layer's input and output of both models at once, so on a large
model (an LLM's logits are sequence x vocabulary) it runs on the first samples of the batch
only: as many as keep that under ``CHECK_BUDGET_BYTES``, counted on one sample first.

``check`` compares the model outputs (flattened, all tensor outputs) by SQNR and cosine and passes
when the output SQNR is at least ``min_sqnr_db`` (``default_floor``: by bit width); ``quantize`` runs it and warns (or, with
``strict=True``, raises ``QuantizationCheckError``) with the table of the worst layers.
"""
from __future__ import annotations

import contextlib

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..data.calibration import item_samples, take
from ..errors import SlimtorchError
from ..graph.capture import call_model
from ..graph.rewrite import decompose_attention, fold_batchnorm
from ..quant.modules import QuantLayerMixin

# Output-SQNR floors (dB) below which ``quantize`` warns, by the recipe's lowest default bit width.
# Measured on the zoo (one calibration batch): working models sit above them — W8A8 resnet20
# 38.6, MiniLM 15.9; W4A4 resnet20 15.4, vit 14.3; w2a2-pdquant resnet20 12.8, w4a2-qdrop
# mobilenetv2 6.3, vit-w4a4-repq MiniLM 0.2 (its hidden states are far from float although its
# retrieval agrees 99 %) — and broken ones below: RTN w2a2 mobilenetv2 -1.0 (20 % top-1), the
# BatchNorm-folding bug on timm EfficientNets (cosine ≈ 0). At 8 bits any output below
# 6 dB (cosine ≈ 0.87) is a bug; random-init deep nets reach ≈ 8 dB (cosine 0.93).
FLOOR_8BIT_DB, FLOOR_LOW_BIT_DB = 6.0, 0.0
CHECK_BUDGET_BYTES = 1 << 30  # layer inputs + outputs the check may hold, both models


def default_floor(recipe) -> float:
    """The output-SQNR floor for a recipe: 6 dB when weights and activations are ≥ 8-bit,
    else 0 dB (noise as large as the signal)."""
    bits = [s.bits for s in (recipe.weights, recipe.activations) if s is not None]
    return FLOOR_8BIT_DB if min(bits, default=8) >= 8 else FLOOR_LOW_BIT_DB


class QuantizationCheckError(SlimtorchError):
    """The quantized model's outputs are too far from the float model's (``strict=True``)."""


class QuantizationCheckWarning(UserWarning):
    """The quantized model's outputs are far from the float model's."""


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − test‖²) in dB; +inf when identical, -inf for a non-finite test."""
    ref, test = ref.detach().double().flatten(), test.detach().double().flatten()
    if not torch.isfinite(test).all():
        return -math.inf
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def _cosine(ref: Tensor, test: Tensor) -> float:
    a, b = ref.detach().double().flatten(), test.detach().double().flatten()
    if not torch.isfinite(b).all():
        return float("nan")
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _flat_outputs(out: Any) -> Tensor:
    tensors = [t.detach().float().flatten() for t in tree_flatten(out)[0]
               if isinstance(t, Tensor) and t.is_floating_point()]
    if not tensors:
        raise SlimtorchError("the model returned no floating-point tensor to compare; "
                             "self-check needs float outputs")
    return torch.cat(tensors)


@dataclass
class LayerCheck:
    name: str
    type: str
    cumulative_sqnr_db: float   # this layer's output, quantized model vs float model
    own_sqnr_db: float          # this layer alone on the float input vs float


@dataclass
class CheckReport:
    output_sqnr_db: float
    output_cosine: float
    min_sqnr_db: float
    passed: bool
    layers: list[LayerCheck] = field(default_factory=list)
    samples: int = 0            # samples of the batch the check ran on

    def worst(self, n: int = 8) -> list[LayerCheck]:
        """The ``n`` layers with the lowest own SQNR (their own error is the largest)."""
        return sorted(self.layers, key=lambda l: l.own_sqnr_db)[:n]

    def to_dict(self, worst: int | None = None) -> dict[str, Any]:
        """JSON-able; with ``worst=n`` only the n worst layers (as ``worst_layers``)."""
        d = asdict(self)
        if worst is not None:
            d.pop("layers")
            d["worst_layers"] = [asdict(l) for l in self.worst(worst)]
        return _finite(d)

    def table(self, n: int | None = 8) -> str:
        """Plain-text table: all layers in model order (``n=None``) or the ``n`` worst."""
        rows = self.layers if n is None else self.worst(n)
        head = f"{'layer':<48} {'type':<16} {'cumulative dB':>13} {'own dB':>8}"
        lines = [head, "-" * len(head)]
        lines += [f"{l.name:<48} {l.type:<16} {l.cumulative_sqnr_db:>13.1f} "
                  f"{l.own_sqnr_db:>8.1f}" for l in rows]
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "ok" if self.passed else f"BELOW the {self.min_sqnr_db:g} dB floor"
        return (f"self-check: output SQNR {self.output_sqnr_db:.1f} dB, cosine "
                f"{self.output_cosine:.4f} to float on {self.samples} samples ({verdict})")


def _finite(d: Any) -> Any:
    """JSON-safe copy: ±inf/nan floats become strings."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_finite(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return str(d)
    return d


def float_twin(float_model: nn.Module, meta: dict) -> nn.Module:
    """A copy of the float model rewritten as the quantized model was (same layer names)."""
    twin = copy.deepcopy(float_model).eval()
    if meta.get("decomposed"):
        with torch.random.fork_rng(devices=[]):  # its nn.Linear constructors draw from the RNG
            decompose_attention(twin)
    folds = [tuple(p) for p in meta.get("bn_folds", [])]
    if folds:
        fold_batchnorm(twin, folds)
    return twin


def _copy(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, tree)


def _record(model: nn.Module, names: set[str], item: Any) -> tuple[Any, dict, dict]:
    """Run ``model`` once; returns its output and the (args, kwargs) and output of each named
    module."""
    inputs, outputs, handles = {}, {}, []

    def keep(store: dict, name: str, value: Any) -> None:  # a hook returning a value would
        if name not in store:                               # replace the module's args/output
            store[name] = _copy(value)  # a copy: later in-place ops (ReLU(inplace=True)) act
                                        # on the module's own output, not on what is kept
    for name, mod in model.named_modules():
        if name in names:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, k, n=name: keep(inputs, n, (a, k)), with_kwargs=True))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: keep(outputs, n, o)))
    try:
        out = call_model(model, item)
    finally:
        for h in handles:
            h.remove()
    return out, inputs, outputs


def unpruned(model: nn.Module):
    """``model`` with its token pruning (Agile-Quant) off inside the block, if it has any."""
    from ..algorithms.agile_prune import pruner_of
    pruner = pruner_of(model)
    return pruner.disabled() if pruner is not None else contextlib.nullcontext()


@torch.no_grad()
def check(qmodel: nn.Module, float_model: nn.Module, item: Any, *,
          min_sqnr_db: float = FLOOR_8BIT_DB, meta: dict | None = None) -> CheckReport:
    """Compare ``qmodel`` with ``float_model`` on one input item (Tensor, tuple or dict)."""
    meta = meta if meta is not None else getattr(qmodel, "_slimtorch_meta", {})
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin)}
    twin = float_twin(float_model, meta)
    item = held_samples(twin, set(qlayers), item)
    f_out, f_in, f_acts = _record(twin, set(qlayers), item)
    with unpruned(qmodel):  # token pruning changes shapes: the check measures quantization
        q_out, _, q_acts = _record(qmodel, set(qlayers), item)
    layers = []
    for name, qmod in qlayers.items():
        if name not in f_acts or name not in q_acts:
            continue  # did not run on this input
        args, kwargs = f_in[name]
        own = qmod(*args, **kwargs)
        layers.append(LayerCheck(name, type(qmod).__name__,
                                 sqnr_db(_flat_outputs(f_acts[name]), _flat_outputs(q_acts[name])),
                                 sqnr_db(_flat_outputs(f_acts[name]), _flat_outputs(own))))
    ref, test = _flat_outputs(f_out), _flat_outputs(q_out)
    out_db = sqnr_db(ref, test)
    return CheckReport(out_db, _cosine(ref, test), min_sqnr_db, out_db >= min_sqnr_db, layers,
                       item_samples(item))


@torch.no_grad()
def held_samples(model: nn.Module, names: set[str], item: Any,
                 budget: int = CHECK_BUDGET_BYTES) -> Any:
    """The first samples of ``item``: as many as keep the named layers' recorded inputs and
    outputs, for the float and the quantized model, within ``budget`` bytes (the bytes of one
    sample are counted by hooks on a forward of one sample)."""
    n = item_samples(item)
    if n == 1:
        return item
    nbytes = [0]

    def count(m, args, out) -> None:
        nbytes[0] += sum(t.numel() * t.element_size() for t in tree_flatten((args, out))[0]
                         if isinstance(t, Tensor))
    handles = [m.register_forward_hook(count) for name, m in model.named_modules()
               if name in names]
    try:
        call_model(model, take(item, torch.arange(1)))
    finally:
        for h in handles:
            h.remove()
    k = max(1, min(n, budget // max(1, 2 * nbytes[0])))
    return item if k == n else take(item, torch.arange(k))


def enforce(report: CheckReport, *, strict: bool, sparse: bool = False) -> None:
    """Warn (or raise, when ``strict``) if the report did not pass; ``sparse``: the recipe
    prunes weights, and the advice is about sparsity."""
    if report.passed:
        return
    fix = ("Leave the worst layers dense (the sparsity method's `exclude:`), give them a lower "
           "sparsity (`ratios:`), or use sparsegpt" if sparse else
           "Keep the worst layers in float (recipe `overrides: {NAME: null}`), raise their "
           "bits, or use a reconstruction recipe")
    msg = (f"{report.summary()}: the compressed model's outputs are far from the float "
           f"model's. Layers with the largest own error:\n{report.table()}\n"
           f"{fix}; `slimtorch inspect DIR` shows every layer.")
    if strict:
        raise QuantizationCheckError(msg)
    warnings.warn(msg, QuantizationCheckWarning, stacklevel=3)
