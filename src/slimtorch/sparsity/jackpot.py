"""Lottery Jackpots (Zhang et al., "Lottery Jackpots Exist in Pre-trained Models", 2021/TPAMI
2023): a good sparse mask hides in the pretrained weights themselves — search it with the
weights frozen, by learning one score per weight.

- Layer ratios from one global magnitude threshold over the pruned layers at the target
  ``sparsity`` (k_l weights kept in layer l); scores start at 1, and at 0.99 where that
  magnitude pruning would cut, so the first mask is the magnitude mask;
- each step the mask of a layer is the top-k_l of its scores, the forward computes with
  W ⊙ M (W frozen), and the scores get the straight-through gradient ∂L/∂(W⊙M) ⊙ W
  (written W·(M + s − sg(s)));
- the paper's short restriction keeps each layer's count: a pruned weight enters only by
  pushing out the lowest-scored kept one, as many in as out (the top-k rule with ties kept on
  the current side, ``stable``);
- SGD on the scores (lr 0.1, momentum 0.9, cosine), distillation from the dense model
  (``srste.distill_loss``) on the training split (or the calibration data, said in the stats);
  after the last step the top-k mask goes on the layer: its weights are the pretrained ones,
  pruned to exactly zero.
The paper trains the scores on labels for a few epochs; recovering a pretrained model without
labels, we distil from the dense model as the recovery method does.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import RecipeError
from ..graph.capture import call_model
from ..methods import MethodContext, register_method
from .base import SparsityConfig, record
from .masks import mask_sparsity, prune_lowest, targets
from .srste import _samples, distill_loss, epoch_batches, epoch_steps


class JackpotConfig(SparsityConfig):
    trains: ClassVar[bool] = True
    epochs: int = Field(1, ge=1, description="passes over the training data")
    lr: float = Field(0.1, gt=0, description="SGD learning rate of the scores (cosine to 0)")
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=1, description="training batch size (Tensor data)")
    temperature: float = Field(1.0, gt=0, description="distillation softmax temperature")

    @model_validator(mode="after")
    def _unstructured(self):
        if self.pattern not in (None, "unstructured") or self.ratios:
            raise ValueError("lottery_jackpot takes one unstructured sparsity (its layer ratios "
                             "come from a global magnitude threshold): no pattern or ratios")
        return self


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Keep the k highest scores (ties: the lower index stays)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.detach().reshape(-1).argsort(descending=True, stable=True)[:k]] = True
    return keep.reshape(scores.shape)


def masked_weight(w: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """W ⊙ M in the forward; ∂/∂scores = ∂L/∂(W⊙M) ⊙ W (straight through the top-k)."""
    return w.detach() * (mask.to(w.dtype) + scores - scores.detach())


def initial_scores(layers: list, sparsity: float) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Scores 1, 0.99 where one global |w| threshold prunes; k_l kept per layer."""
    flat = torch.cat([l.weight.detach().abs().reshape(-1) for _, l, _ in layers])
    keep = prune_lowest(flat, sparsity).split([l.weight.numel() for _, l, _ in layers])
    scores, kept = {}, {}
    for (f, l, _), k in zip(layers, keep):
        s = torch.ones(l.weight.shape)
        s[~k.reshape(l.weight.shape)] = 0.99
        scores[f], kept[f] = s.requires_grad_(), int(k.sum())
    return scores, kept


@register_method("lottery_jackpot", JackpotConfig)
def apply(model, cfg: JackpotConfig, ctx: MethodContext) -> dict[str, Any]:
    if ctx.float_model is None:
        raise RecipeError("lottery_jackpot distils from the untouched float model, which "
                          "inplace=True does not keep: sparsify a copy (inplace=False)")
    if cfg.sparsity is None:
        raise RecipeError("lottery_jackpot needs a target sparsity (e.g. sparsity: 0.5)")
    layers, skipped = targets(model, cfg)
    scores, kept = initial_scores(layers, cfg.sparsity)
    start = {f: topk_mask(s, kept[f]) for f, s in scores.items()}
    data, source = ((ctx.train_batches, "train") if ctx.train_batches
                    else (ctx.batches, "calibration"))
    t0 = time.perf_counter()
    history = _search(model, ctx.float_model, layers, scores, kept, data, cfg, ctx)
    stats = {}
    with torch.no_grad():
        for f, layer, _ in layers:
            mask = topk_mask(scores[f], kept[f])
            layer.set_weight_mask(mask)
            stats[f] = {"sparsity": mask_sparsity(mask),
                        "swapped_from_magnitude": int((mask & ~start[f]).sum())}
    note = {} if source == "train" else {
        "note": "no training data given: scores trained on the calibration batches"}
    return record(model, stats, skipped, data=source, samples=_samples(data), epochs=history,
                  seconds=round(time.perf_counter() - t0, 2), **note)


def _search(model, teacher, layers, scores, kept, data, cfg, ctx) -> list[dict]:
    """The score-training loop; the layers' own masks are lifted while it runs."""
    opt = torch.optim.SGD(list(scores.values()), lr=cfg.lr, momentum=cfg.momentum)
    per_epoch = epoch_steps(data, cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * per_epoch)
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 31)
    saved = {f: l.weight_mask for f, l, _ in layers}
    weights = {f: l.weight.detach() for f, l, _ in layers}
    history = []
    model.eval(), teacher.eval()
    try:
        for _, l, _ in layers:
            l.weight_mask = None
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for item in tqdm(epoch_batches(data, cfg.batch_size, gen), total=per_epoch,
                             disable=not ctx.progress, leave=False,
                             desc=f"jackpot {epoch + 1}/{cfg.epochs}"):
                sub = {f"{f}.weight": masked_weight(weights[f], s, topk_mask(s, kept[f]))
                       for f, s in scores.items()}
                with torch.no_grad():
                    target = call_model(teacher, item)
                loss = distill_loss(call_model(model, item, sub), target, cfg.temperature)
                leaves = list(scores.values())  # only the scores train
                for s, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                    s.grad = g
                opt.step()
                sched.step()
                total, count = total + loss.item(), count + 1
            history.append({"epoch": epoch + 1, "loss": round(total / max(count, 1), 6)})
    finally:
        for f, l, _ in layers:
            l.weight_mask = saved[f]
    return history
