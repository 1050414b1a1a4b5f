"""SR-STE recovery (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
From Scratch", ICLR 2021): train the pruned layers' weights with the sparse forward and a
sparse-refined straight-through backward, distilling from the dense model.

Each step, for every pruned layer:
- the mask M is recomputed from |W| of the *dense* weight W being trained: N:M along the
  input dimension (``masks.nm_mask``; input channels at each kernel tap for a convolution),
  or, unstructured, the layer's k smallest |W| pruned (k = the pruned count of the mask the
  layer held when SR-STE started, so SparseGPT's block-wise or a global magnitude mask keeps
  its per-layer ratio; ``sparsity``/``ratios`` when the layer had none);
- forward with W̃ = W ⊙ M, written W + (W⊙M − W).detach() (``ste``) and substituted for the
  layer's weight by ``torch.func.functional_call`` — no layer class is touched; with a weight
  quantizer the layer computes Q(W̃) on its fixed grid (rounding straight-through);
- backward: ∂L/∂W̃ passed straight to the dense W, plus the sparse-refined term
  λ_w·(1 − M) ⊙ W (λ_w = 2e-4, the paper's and the public code's ``decay``) that pulls the
  pruned weights towards zero, so the mask settles; SGD (momentum) with cosine decay steps W.
After the last step the final mask from |W| goes on the layer (``set_weight_mask``: the pruned
weights become exactly zero).

Loss: distillation from ``MethodContext.float_model`` (the untouched float model, BN not
folded; run in eval mode): T²·KL(softmax(t/T) ‖ softmax(s/T)) for 2-D outputs (classifier
logits), MSE for other tensor outputs. The paper trains from scratch on labels; recovery of a
pretrained, one-shot pruned model from the dense one needs no labels, so any training images
do. Data: ``MethodContext.train_batches`` (the task's train split, ``--train-size``), else the
calibration batches (the stats say which).

Paper vs public code: we follow both where they agree (mask from |W| every step, the decay
2e-4 added to the gradient, SGD momentum 0.9 with cosine decay). The public code
(NM-sparsity ``devkit/sparse_ops/sparse_ops.py``) groups M consecutive entries of the flattened
weight — for a k×k convolution that runs over kernel taps of one input channel, not over input
channels; we group along input channels at each tap (``masks.nm_mask``: NVIDIA ASP's layout,
the one 2:4 hardware reads, and the one the one-shot methods used, so the recovered mask has
the structure of the mask it starts from). The public code trains 120 epochs from scratch at lr 0.1 (batch 256); a 3-epoch recovery starts from a
good solution, so the default lr is 0.01 at batch 128 (a tenth of the zoo's training lr, the
usual fine-tuning choice) and no weight decay beyond λ_w. The student runs in eval mode: BN is
folded into its convolutions, so there are no batch statistics to train (dropout is off).
Only the pruned layers' weights and biases train; quantizer parameters stay as calibrated.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import RecipeError
from ..graph.capture import call_model
from ..methods import MethodConfig, MethodContext, register_method
from .base import SparsityConfig, record
from .masks import (Pattern, compute_layers, mask_sparsity, masks_of, nm_mask, parse_pattern,
                    targets)

_INHERITED = ("sparsity", "pattern", "dense_first", "dense_last", "dense_depthwise", "exclude",
              "ratios")


class SRSTEConfig(SparsityConfig):
    """SR-STE recovery. ``pattern``/``sparsity`` omitted: those of the sparsity method before
    it in the recipe (with its layer choice: dense_first/last, exclude, ratios)."""

    trains: ClassVar[bool] = True
    epochs: int = Field(3, ge=1, description="passes over the training data")
    lr: float = Field(0.01, gt=0, description="initial SGD learning rate (cosine to 0)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    batch_size: int = Field(128, ge=1, description="training batch size (Tensor data)")
    decay: float = Field(2e-4, ge=0, description="λ_w of the sparse-refined term λ_w(1−M)⊙W")
    temperature: float = Field(1.0, gt=0, description="distillation softmax temperature")

    @model_validator(mode="after")
    def _one_pattern(self):  # replaces SparsityConfig's: both may be omitted here
        if self.sparsity is None and self.pattern is None and not self.ratios:
            return self
        if self.sparsity is not None and self.pattern not in (None, "unstructured"):
            raise ValueError("give either sparsity (unstructured) or an N:M pattern, not both")
        if self.ratios and self.pattern not in (None, "unstructured"):
            raise ValueError("per-layer ratios apply to unstructured sparsity")
        if self.sparsity is None and self.pattern == "unstructured" and not self.ratios:
            raise ValueError("unstructured needs a sparsity (e.g. sparsity: 0.5)")
        parse_pattern(self.sparsity if self.sparsity is not None else 0.5, self.pattern)
        return self

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        """The previous sparsity method's pattern and layer choice when ours are omitted."""
        if self.sparsity is not None or self.pattern is not None or self.ratios:
            return {}
        prev = previous_sparsity(self, ctx.recipe.methods)
        if prev is None:
            raise RecipeError("srste has no pattern or sparsity and no sparsity method runs "
                              "before it in the recipe: give one (pattern: '2:4' or sparsity: "
                              "0.5), or put e.g. {name: sparsegpt, pattern: '2:4'} before it")
        got = {k: getattr(prev, k) for k in _INHERITED if k not in self.model_fields_set}
        if getattr(prev, "allocation", "uniform") == "rd" and "ratios" not in self.model_fields_set:
            # the ratios rd chose are in the model's masks, not in the recipe's config
            masks = masks_of(model)
            got["ratios"] = {f: mask_sparsity(m) for f, m in masks.items()}
            got["exclude"] = [f for f, _ in compute_layers(model) if f not in masks]
        return got


def previous_sparsity(cfg: MethodConfig, methods: list) -> MethodConfig | None:
    """The nearest method before ``cfg`` in ``methods`` that puts masks with a set pattern."""
    idx = next((i for i, m in enumerate(methods) if m is cfg), None)
    for m in reversed(methods[:idx] if idx is not None else []):
        if m.masks_weights and (
                getattr(m, "sparsity", None) is not None or getattr(m, "pattern", None)
                not in (None, "unstructured") or getattr(m, "ratios", None)):
            return m
    return None


# ------------------------------------------------------------------ the rule
def sparse_mask(w: Tensor, pattern: Pattern, n_pruned: int) -> Tensor:
    """Keep-mask from |W|: N:M along the input dimension, else the ``n_pruned`` smallest |W|
    of the layer pruned (ties: the lower index goes, as ``masks.prune_lowest``)."""
    if pattern.structured:
        return nm_mask(w.detach().abs(), pattern.n, pattern.m)
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[w.detach().abs().reshape(-1).argsort(stable=True)[:n_pruned]] = False
    return keep.reshape(w.shape)


def ste(w: Tensor, mask: Tensor) -> Tensor:
    """W ⊙ M in the forward; the gradient reaches the dense W unmasked (straight through)."""
    return w + (w * mask - w).detach()


def refine(grad: Tensor, w: Tensor, mask: Tensor, decay: float) -> Tensor:
    """SR-STE's gradient of the dense W: g + λ_w·(1 − M) ⊙ W."""
    return grad + decay * (~mask).to(w.dtype) * w.detach()


def distill_loss(student: Any, teacher: Any, temperature: float) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) for [B, classes] logits, MSE for other tensors."""
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise RecipeError(f"srste distils the model's output, which is a "
                          f"{type(student).__name__}, not a Tensor: wrap the model so its "
                          "forward returns one tensor (e.g. the logits)")
    if student.dim() == 2:
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                        log_target=True, reduction="batchmean") * t * t
    return F.mse_loss(student, teacher)


# ------------------------------------------------------------------ data
def _tensors(items: list) -> bool:
    return all(isinstance(x, Tensor) for x in items)


def epoch_steps(items: list, batch_size: int) -> int:
    return -(-_samples(items) // batch_size) if _tensors(items) else len(items)


def epoch_batches(items: list, batch_size: int, gen: torch.Generator):
    """One epoch in a seeded order (a generator): Tensor items re-batched to ``batch_size``
    from a permutation of all samples; other items (tuples, dicts) in a permuted item order."""
    if _tensors(items):
        data = items[0] if len(items) == 1 else torch.cat(items)
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            yield data[perm[i:i + batch_size]]
        return
    for i in torch.randperm(len(items), generator=gen).tolist():
        yield items[i]


def _samples(items: list) -> int:
    return sum(len(x) if isinstance(x, Tensor) else 1 for x in items)


# ------------------------------------------------------------------ the method
@register_method("srste", SRSTEConfig)
def apply(model, cfg: SRSTEConfig, ctx: MethodContext) -> dict[str, Any]:
    teacher = ctx.float_model
    if teacher is None:
        raise RecipeError("srste distils from the untouched float model, which inplace=True "
                          "does not keep: quantize/sparsify a copy (inplace=False)")
    if cfg.sparsity is None and cfg.pattern is None and not cfg.ratios:
        cfg = cfg.resolve(model, ctx)
    layers, skipped = targets(model, cfg)
    for fqn, layer, _ in list(layers):
        if getattr(layer, "frozen", False):
            skipped[fqn] = "frozen by an earlier method"
    layers = [(f, l, s) for f, l, s in layers if f not in skipped]
    pattern = cfg.pattern_obj()
    n_pruned = {f: int((~l.weight_mask).sum()) if l.weight_mask is not None
                else int(l.weight.numel() * s) for f, l, s in layers}
    data, source = ((ctx.train_batches, "train") if ctx.train_batches
                    else (ctx.batches, "calibration"))
    t0 = time.perf_counter()
    weights, history = train(model, teacher, layers, pattern, n_pruned, data, cfg, ctx)
    stats = {}
    with torch.no_grad():
        for fqn, layer, _ in layers:
            w, b = weights[fqn]
            layer.weight.data.copy_(w)
            if b is not None:
                layer.bias.data.copy_(b)
            mask = sparse_mask(w, pattern, n_pruned[fqn])
            layer.set_weight_mask(mask)
            stats[fqn] = {"sparsity": mask_sparsity(mask)}
    note = {} if source == "train" else {
        "note": "no training data given: trained on the calibration batches"}
    return record(model, stats, skipped, data=source, samples=_samples(data),
                  epochs=history, seconds=round(time.perf_counter() - t0, 2), **note)


def train(model, teacher, layers, pattern: Pattern, n_pruned: dict[str, int], data: list,
          cfg: SRSTEConfig, ctx: MethodContext):
    """The SR-STE loop; returns {fqn: (W, bias)} trained and the per-epoch history. The
    layers' masks are lifted while it runs (the forward applies the step's own mask) and
    put back if it fails."""
    weights = {f: (l.weight.detach().clone().requires_grad_(),
                   None if l.bias is None else l.bias.detach().clone().requires_grad_())
               for f, l, _ in layers}
    params = [t for pair in weights.values() for t in pair if t is not None]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 29)
    per_epoch = epoch_steps(data, cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * per_epoch)
    saved = {f: l.weight_mask for f, l, _ in layers}
    was_training, teacher_training = model.training, teacher.training
    model.eval(), teacher.eval()
    masks = {f: sparse_mask(w, pattern, n_pruned[f]) for f, (w, _) in weights.items()}
    history = []
    try:
        for f, l, _ in layers:
            l.weight_mask = None
        for epoch in range(cfg.epochs):
            start, total, count = dict(masks), 0.0, 0
            bar = tqdm(epoch_batches(data, cfg.batch_size, gen), total=per_epoch,
                       disable=not ctx.progress, desc=f"srste {epoch + 1}/{cfg.epochs}",
                       leave=False)
            for item in bar:
                loss = step(model, teacher, weights, masks, pattern, n_pruned, item, cfg, opt)
                sched.step()
                total, count = total + loss, count + 1
                bar.set_postfix(loss=f"{loss:.4f}")
            flips = sum(int((masks[f] != start[f]).sum()) for f in masks)
            history.append({"epoch": epoch + 1, "loss": round(total / max(count, 1), 6),
                            "mask_flips": flips,
                            "flip_rate": round(flips / sum(m.numel() for m in masks.values()), 6)})
    finally:
        for f, l, _ in layers:
            l.weight_mask = saved[f]
        model.train(was_training), teacher.train(teacher_training)
    return {f: (w.detach(), None if b is None else b.detach()) for f, (w, b) in
            weights.items()}, history


def step(model, teacher, weights, masks, pattern, n_pruned, item, cfg, opt) -> float:
    """One SR-STE update; ``masks`` is refreshed in place from the weights it trains."""
    for f, (w, _) in weights.items():
        masks[f] = sparse_mask(w, pattern, n_pruned[f])
    sub = {}
    for f, (w, b) in weights.items():
        sub[f"{f}.weight"] = ste(w, masks[f])
        if b is not None:
            sub[f"{f}.bias"] = b
    with torch.no_grad():
        target = call_model(teacher, item)
    loss = distill_loss(call_model(model, item, sub), target, cfg.temperature)
    leaves = [t for pair in weights.values() for t in pair if t is not None]
    grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    for f, (w, b) in weights.items():
        gw = next(grads)
        w.grad = refine(torch.zeros_like(w) if gw is None else gw, w, masks[f], cfg.decay)
        if b is not None:
            gb = next(grads)
            b.grad = torch.zeros_like(b) if gb is None else gb
    opt.step()
    return loss.detach().item()
