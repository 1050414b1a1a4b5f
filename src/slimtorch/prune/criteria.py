"""Importance of each prunable unit (one coupled channel in every layer of its group).

* ``magnitude``: the L1 or L2 norm of all the unit's weights in its group — producer rows,
  consumer columns, BatchNorm scale — ``(Σ |w|^p)^(1/p)`` (Li et al., "Pruning Filters for
  Efficient ConvNets", 2017, for L1 over a filter; extended over the group as in DepGraph).
* ``taylor``: first-order Taylor ``Σ |w · ∂L/∂w|`` over the same weights (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning", CVPR 2019, per-weight form, summed over
  the group as Torch-Pruning's ``TaylorImportance`` does), gradients accumulated over the
  calibration batches. The loss: cross-entropy against the model's own top-1 prediction for
  [B, classes] outputs (the calibration data has no labels, and a KL to the float model is
  zero with zero gradient at the float weights, so the float model's hard labels stand in),
  ½‖y‖² for any other output.
* ``random``: seeded uniform scores, the floor.

``normalize: mean`` divides each score by the mean score of its group (Torch-Pruning's default
``normalizer='mean'``), so one global ranking compares groups of different sizes and scales.
Torch-Pruning reduces a group by the *mean* of per-layer p-th powers (no root); we take the
norm over all the unit's weights (the root makes L1 and L2 comparable across groups); with
``normalize: mean`` the ranking within a group is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..graph.capture import call_model
from .groups import Groups


def _slices(mod: nn.Module, role: str, pos: Tensor, t: Tensor) -> Tensor:
    """The unit's values of tensor ``t`` (a weight or its gradient) in one entry."""
    if role == "in" and getattr(mod, "groups", 1) == 1:
        return t[:, pos]
    return t[pos]


def unit_reduce(model: nn.Module, groups: Groups, fn) -> Tensor:
    """For every unit, Σ over its entries of ``fn(module, weight slice, grad slice)`` — a
    scalar ([units]) or a vector of k statistics ([units, k])."""
    named = dict(model.named_modules())
    rows = []
    for u in groups.units:
        total = 0.0
        for fqn, role, pos in u.where:
            mod = named[fqn]
            w = mod.weight
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            total = total + fn(_slices(mod, role, pos, w.detach()),
                               _slices(mod, role, pos, g)).double()
        rows.append(torch.as_tensor(total, dtype=torch.float64).reshape(-1))
    out = torch.stack(rows)
    return out[:, 0] if out.shape[1] == 1 else out


def magnitude(model: nn.Module, groups: Groups, p: int) -> Tensor:
    return unit_reduce(model, groups, lambda w, g: w.abs().pow(p).sum()).pow(1.0 / p)


def taylor_loss(out) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        out = next(v for v in out.values() if isinstance(v, Tensor))
    if out.dim() == 2:
        return F.cross_entropy(out, out.detach().argmax(1))
    return 0.5 * out.float().pow(2).mean()


def taylor(model: nn.Module, groups: Groups, batches: list) -> Tensor:
    """Σ |w·∇w| per unit, gradients summed over ``batches`` (model in eval mode)."""
    was = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for item in batches:
            taylor_loss(call_model(model, item)).backward()
        return unit_reduce(model, groups, lambda w, g: (w * g).abs().sum())
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        model.train(was)


def random_scores(groups: Groups, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 41)
    return torch.rand(len(groups.units), generator=gen, dtype=torch.float64)


def normalize_mean(scores: Tensor, groups: Groups) -> Tensor:
    """Each score divided by its group's mean score."""
    out = scores.clone()
    for us in groups.groups:
        idx = torch.tensor(us)
        mean = scores[idx].mean()
        out[idx] = scores[idx] / mean if mean > 0 else scores[idx]
    return out


HESSO_TERMS = ("magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order",
               "taylor_second_order")


def saliency_terms(model: nn.Module, groups: Groups) -> dict[str, Tensor]:
    """HESSO's five raw terms per unit from the weights and the gradients in ``.grad``:
    ‖x‖, ‖x‖/n (n = the unit's weight count), cos(x, ∇)+1, |xᵀ∇| and ½(xᵀ∇)²."""
    st = unit_reduce(model, groups, lambda w, g: torch.stack([
        w.double().pow(2).sum(), g.double().pow(2).sum(), (w.double() * g.double()).sum(),
        torch.tensor(float(w.numel()), dtype=torch.float64)]))
    ww, gg, wg, n = st.unbind(1)
    norm_w, norm_g = ww.sqrt(), gg.sqrt()
    den = norm_w * norm_g  # a unit without weight or gradient counts as orthogonal: cos 0
    cos = torch.where(den > 0, wg / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    return {"magnitude": norm_w, "avg_magnitude": norm_w / n, "cosine_similarity": cos + 1,
            "taylor_first_order": wg.abs(), "taylor_second_order": 0.5 * wg.pow(2)}


def saliency(model: nn.Module, groups: Groups, weights: dict[str, float]) -> Tensor:
    """HESSO's saliency (Chen et al., "HESSO: Towards Automatic Efficient and User Friendly
    Any Neural Network Training and Pruning", 2024): Σ_k weight_k · term_k / ‖term_k‖₂, each
    term normalised by its L2 norm over all units; low = redundant. As the public code
    (only_train_once ``compute_importance_scores``); the gradient is the current mini-batch's
    (theirs: the optimizer's gradient variant, with momentum); a unit's weights are its every
    slice (producer rows, consumer columns, BatchNorm scale) as ``magnitude`` takes them —
    theirs, the producer side of the zero-invariant group with its bias."""
    terms = saliency_terms(model, groups)
    out = torch.zeros(len(groups.units), dtype=torch.float64)
    for name, w in weights.items():
        t = terms[name]
        if w and t.norm() > 0:  # a term that is 0 on every unit ranks nothing
            out += w * t / t.norm()
    return out

