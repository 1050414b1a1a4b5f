"""PD-Quant's two additions (Liu et al., CVPR 2023), as its published code computes them.

Prediction difference: the unit's output on the pure quantized input is pushed through the rest
of the network in float, z_q; L_pd = KL(softmax(z_fp/T) ‖ softmax(z_q/T)) / λ_r ('batchmean').
"The rest of the network" is ``suffix.SuffixRunner`` (the float prefix is not recomputed).

Distribution correction: a trainable copy x of the unit's float input x₀ is optimised so that the
per-sample, per-channel spatial mean/std of the input of every BatchNorm inside the unit (run on
an *unfolded* float copy of the model) match the BN running statistics, plus ‖x − x₀‖²/λ_c.
Adam, ReduceLROnPlateau(patience 100, min lr 1e-5). The objective is a mean over samples of
per-sample terms and Adam is element-wise, so we optimise ``dc_batch`` samples at once (the code
uses 32) — the same per-sample optimum, faster on CPU.

Both plug into the reconstruction runner as one ``PDTerm`` (a ``recon.UnitTerm``): ``setup``
caches the float model's logits on the calibration set, ``correct`` is DC, ``bind`` is L_pd.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.cache import CachePool
from ..data.calibration import take
from ..errors import CalibrationDataError, SlimtorchError
from ..graph.capture import call_model
from ..quant.prepare import quant_state
from ..runner.recon import Context, UnitTerm, rec_loss
from ..runner.recon_cache import cat_items, unit_map
from ..runner.units import Unit
from .suffix import SuffixRunner


@dataclass(frozen=True)
class PDSettings:
    temperature: float = 4.0
    pd_weight: float = 10.0      # 1/λ_r, λ_r = 0.1
    dc_steps: int = 500
    dc_lr: float = 1e-3
    lambda_c: float = 0.02
    dc_batch: int = 256


def pd_loss(z_q: Tensor, z_fp: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_fp/T) ‖ softmax(z_q/T)), 'batchmean', no T² factor (PD-Quant code)."""
    return nn.functional.kl_div(torch.log_softmax(z_q / temperature, 1),
                                torch.softmax(z_fp / temperature, 1), reduction="batchmean")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: list, pool: CachePool) -> Tensor:
    outs = [call_model(model, b) for b in batches]
    if not all(isinstance(o, Tensor) for o in outs):
        raise SlimtorchError("PD-Quant needs a model that returns a logits tensor; use qdrop "
                             "for models with other outputs")
    z = pool.empty((sum(len(o) for o in outs), *outs[0].shape[1:]))
    torch.cat(outs, out=z)
    return z



class PDTerm(UnitTerm):
    """PD-Quant's additions to the QDrop stage: DC of each unit's float input, and L_pd."""

    def __init__(self, pd: PDSettings, batch_size: int):
        self.pd, self.batch_size = pd, batch_size
        self.inputs = self.logits_fp = None  # all calibration items; the float model's logits

    def setup(self, ctx: Context) -> None:
        if self.pd.dc_steps > 0 and ctx.float_model is None:
            raise SlimtorchError("PD-Quant's distribution correction needs the untouched float "
                                 "model: call quantize with inplace=False, or set dc_steps: 0")
        self.inputs = cat_items(ctx.batches)
        with torch.no_grad(), quant_state(ctx.model, weights=False, acts=False):
            self.logits_fp = model_outputs(ctx.model, ctx.batches, ctx.pool)

    def correct(self, ctx: Context, unit: Unit, x_fp: Tensor, y_fp: Tensor
                ) -> tuple[Tensor, Tensor, dict]:
        if self.pd.dc_steps <= 0:
            return x_fp, y_fp, {}
        t0 = time.perf_counter()
        x_fp, y_fp, dc = correct_unit_inputs(ctx, unit, x_fp, y_fp, self.pd)
        dc["seconds"] = round(time.perf_counter() - t0, 2)
        return x_fp, y_fp, {"dc": dc}

    def bind(self, ctx: Context, mod: nn.Module, y_fp: Tensor):
        """L_pd on (unit output, sample indices); the suffix runs the rest of the network."""
        first = torch.arange(min(self.batch_size, len(y_fp)))
        if len(first) < self.batch_size:
            raise CalibrationDataError(
                f"PD-Quant needs at least batch_size={self.batch_size} calibration samples, "
                f"got {len(first)}; give more calibration data or lower its batch_size")
        suffix = SuffixRunner(ctx.model, mod, take(self.inputs, first), y_fp[first])
        return (lambda out_q, idx: self.loss(suffix, out_q, idx)), {"suffix": suffix.mode}

    def loss(self, suffix: SuffixRunner, out_q: Tensor, idx: Tensor) -> Tensor:
        z_q = suffix(out_q, take(self.inputs, idx))
        return self.pd.pd_weight * pd_loss(z_q, self.logits_fp[idx], self.pd.temperature)


def bn_stat_loss(inp: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """(1/N)Σ_n ‖μ − m_n(x)‖² + (1/N)Σ_n ‖σ − s_n(x)‖², m_n/s_n per-sample channel stats."""
    var, m = torch.var_mean(inp.flatten(2), 2, unbiased=False)  # [N, C, spatial] -> [N, C]
    s = torch.sqrt(var + bn.eps)
    mu, sigma = bn.running_mean, torch.sqrt(bn.running_var + bn.eps)
    return (mu - m).square().sum(1).mean() + (sigma - s).square().sum(1).mean()


def dc_objective(x: Tensor, x0: Tensor, bn_inputs: list[tuple[Tensor, nn.Module]],
                 lambda_c: float) -> Tensor:
    return sum(bn_stat_loss(i, bn) for i, bn in bn_inputs) + rec_loss(x, x0) / lambda_c


def correct(unit_float: nn.Module, bns: list[nn.Module], x0: Tensor, pd: PDSettings
            ) -> tuple[Tensor, float, float]:
    """Distribution-corrected copy of x0 (one chunk). Returns x*, objective before, after."""
    seen: list[tuple[Tensor, nn.Module]] = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: seen.append((a[0], m))) for bn in bns]
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=pd.dc_lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100, min_lr=1e-5)
    first = last = float("nan")
    try:
        for step in range(pd.dc_steps + 1):
            seen.clear()
            unit_float(x)
            loss = dc_objective(x, x0, seen, pd.lambda_c)
            last = loss.item()
            first = last if step == 0 else first
            if step == pd.dc_steps:
                break
            (g,) = torch.autograd.grad(loss, x)
            x.grad = g
            opt.step()
            sched.step(last)
    finally:
        for h in hooks:
            h.remove()
    return x.detach(), first, last


def correct_unit_inputs(ctx: Context, unit: Unit, x_fp: Tensor, y_fp: Tensor,
                        pd: PDSettings) -> tuple[Tensor, Tensor, dict]:
    """DC for a unit: corrected inputs and their float targets (unchanged if the unit has no
    BatchNorm or no float copy of the model was given)."""
    convs = set(unit.layers)
    bn_names = [bn for conv, bn in ctx.bn_folds if conv in convs]
    if ctx.float_model is None or not bn_names:
        return x_fp, y_fp, {"applied": False}
    unit_float = ctx.float_model.get_submodule(unit.name)
    bns = [ctx.float_model.get_submodule(b) for b in bn_names]
    before, after = [], []
    x_new = ctx.pool.empty(tuple(x_fp.shape))
    for i in range(0, len(x_fp), pd.dc_batch):
        x_new[i:i + pd.dc_batch], b, a = correct(unit_float, bns, x_fp[i:i + pd.dc_batch], pd)
        before.append(b)
        after.append(a)
    mod = ctx.model.get_submodule(unit.name)
    with quant_state(ctx.model, weights=False, acts=False):
        y_new = unit_map(mod, x_new, ctx.pool)
    ctx.pool.release(x_fp)
    ctx.pool.release(y_fp)
    n = len(before)
    return x_new, y_new, {"applied": True, "bn_layers": len(bns),
                          "objective_before": sum(before) / n, "objective_after": sum(after) / n}
