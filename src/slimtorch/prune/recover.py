"""Recovery after structured pruning: fine-tune every parameter of the pruned float model by
knowledge distillation from the unpruned float model (Hinton et al., "Distilling the Knowledge
in a Neural Network", 2015).

Loss = ``kd_weight``·T²·KL(softmax(t/T) ‖ softmax(s/T)) + ``ce_weight``·CE(s, argmax t) for
[B, classes] outputs (``sparsity.srste.distill_loss``; MSE for other outputs). The zoo's
training split has no labels in this path (``MethodContext.train_batches`` holds images), so
the "task" cross-entropy uses the float model's hard predictions; ``ce_weight: 0`` (default)
is pure distillation. SGD with momentum, cosine decay over the budget (``epochs``, or
``steps`` when given), the gradient's global norm clipped to ``max_grad_norm`` (a pruned net
fine-tuned at a high rate on few images can otherwise blow up within a few steps; a loss that
still turns non-finite restores the weights from before recovery and is an error naming the
fix); the student trains in train mode (BatchNorm batch statistics, the
standard fine-tuning setting), the teacher runs in eval mode. Data: the training split when
the pipeline loaded it (``trains``), else the calibration batches (the stats say which).
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from ..errors import PruningError, RecipeError
from ..graph.capture import call_model
from ..methods import MethodConfig, MethodContext, register_method
from ..sparsity.srste import distill_loss, epoch_batches, epoch_steps


class RecoverConfig(MethodConfig):
    structural: ClassVar[bool] = True   # runs on the float pruned model, before quantization
    trains: ClassVar[bool] = True
    epochs: float = Field(1, gt=0, description="passes over the training data (0.5: half "
                          "an epoch)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    lr: float = Field(0.01, gt=0, description="initial SGD learning rate (cosine to 0)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1, description="training batch size (Tensor data)")
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    kd_weight: float = Field(1.0, ge=0, description="weight of T²·KL")
    ce_weight: float = Field(0.0, ge=0, description="weight of CE against the teacher's top-1")
    max_grad_norm: float | None = Field(5.0, gt=0, description="clip the gradient's global "
                                        "L2 norm to this (None: no clipping)")


def recovery_loss(student, teacher, cfg: RecoverConfig) -> torch.Tensor:
    loss = cfg.kd_weight * distill_loss(student, teacher, cfg.temperature)
    if cfg.ce_weight and student.dim() == 2:
        loss = loss + cfg.ce_weight * F.cross_entropy(student, teacher.argmax(1))
    return loss


def budget(cfg: RecoverConfig, ctx: MethodContext) -> tuple[list, str, int, int]:
    """(data, "train" | "calibration", steps per epoch, total steps) of a training run."""
    data, source = ((ctx.train_batches, "train") if ctx.train_batches
                    else (ctx.batches, "calibration"))
    per_epoch = epoch_steps(data, cfg.batch_size)
    return data, source, per_epoch, cfg.steps or max(1, round(cfg.epochs * per_epoch))


def distil(model, cfg: RecoverConfig, ctx: MethodContext, desc: str = "recover (KD)",
           before_step: Callable[[int], None] | None = None,
           after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The distillation loop (module docstring) over ``cfg``'s budget; the record.
    ``before_step(step)`` runs after the backward pass, before the optimizer step (the
    gradients are there); ``after_step(step)`` after it (``hesso`` projects weights there)."""
    teacher = ctx.float_model
    if teacher is None:
        raise RecipeError("recover distils from the untouched float model, which inplace=True "
                          "does not keep: prune a copy (inplace=False)")
    data, source, per_epoch, total = budget(cfg, ctx)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 53)
    batches = itertools.chain.from_iterable(
        epoch_batches(data, cfg.batch_size, gen) for _ in itertools.count())
    t0, history, run = time.perf_counter(), [], 0.0
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was, teacher_was = model.training, teacher.training
    model.train(), teacher.eval()
    bar = tqdm(range(total), disable=not ctx.progress, desc=desc, leave=False)
    try:
        for step in bar:
            item = next(batches)
            with torch.no_grad():
                target = call_model(teacher, item)
            loss = recovery_loss(call_model(model, item), target, cfg)
            if not torch.isfinite(loss):
                model.load_state_dict(start)
                raise PruningError(
                    f"{desc} diverged at step {step + 1} of {total} (loss "
                    f"{loss.item()}); the weights from before it are back. Lower lr (now "
                    f"{cfg.lr}) or max_grad_norm (now {cfg.max_grad_norm}) in the recipe")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step(step)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(step)
            run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
            bar.set_postfix(loss=f"{run:.4f}")
            if (step + 1) % per_epoch == 0 or step + 1 == total:
                history.append({"step": step + 1, "loss": round(run, 6)})
    finally:
        model.train(was), teacher.train(teacher_was)
        for p in params:
            p.grad = None
    note = {} if source == "train" else {
        "note": "no training data given: trained on the calibration batches"}
    return {"data": source, "steps": total, "history": history,
            "seconds": round(time.perf_counter() - t0, 2), **note}


@register_method("recover", RecoverConfig)
def apply(model, cfg: RecoverConfig, ctx: MethodContext) -> dict[str, Any]:
    return distil(model, cfg, ctx)
