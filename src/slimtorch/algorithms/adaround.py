"""AdaRound (Nagel et al., ICML 2020): learn each weight's rounding direction, layer by layer.

W̃ = s·(clip(⌊W/s⌋ + h(V) + z, q_min, q_max) − z), h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1), ζ = 1.1,
γ = −0.1, V initialised so h(V) = frac(W/s). Per layer, minimise
‖layer(x_q) − layer_fp(x_fp)‖² + λ·Σ(1 − |2h(V) − 1|^β) with Adam on V; the regulariser is off
for the first 20 % of the steps, then β decays linearly 20 → 2; hard rounding at the end.
Activation quantization stays off during the weight search (its calibrated ranges are kept).

Learning rate of V (``lr: auto``): the published rate (1e-3; PD-Quant 3e-3) for 20 000
iterations, floored at ``V_TRAVEL / iters`` so that with few iterations Adam can still move V
across its active range (h(V) saturates at |V| ≈ 2.4; V starts at ±2.4 at most): 1e-2 at the
200-iteration CPU default; the published rate from 667 iterations on for PD-Quant (3e-3), from
2000 for AdaRound/BRECQ/QDrop (1e-3). At 200 iterations and 3e-3, V moves ≤ 0.6, so only weights
whose fractional part is near 0.5 can change their rounding (measured in
``bench/results/ptq_recon_actlr.md``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat

from ..methods import MethodConfig, MethodContext, register_method
from ..runner import recon, units
from ..runner.recon import Stage

# CPU default of every reconstruction method (papers: 20 000 per unit, `methods: [{name: M, iters:
# 20000}]`). Chosen by measurement: PD-Quant, the costliest method, W2A2 on zoo ResNet-20, 1 thread
# on the shared 2-core machine (load ≈ 2.7): ≈ 1.06 s per iteration summed over its 11 units
# and ≈ 8.3 s per distribution-correction step (all units, 1024 images); 100 iterations and 10
# DC steps gave 88.17 % top-1 (float 93.14, RTN 72.40) in 218 s of calibration; 200 iterations
# + 10 DC steps (this default) gave 88.65 % in 309 s (bench/ptq_recon.py, seed 0, load ≈ 3.7) —
# both with the published learning rates; the `auto` rates below (V lr 1e-2, LSQ lr 4e-3 at 200
# iterations) gave 90.82 % at the same cost (bench/results/ptq_recon_actlr.md).
# The paper setting (20 000 + 500 DC steps) costs ≈ 6 h + 1 h there.
CPU_ITERS = 200
PAPER_ITERS = 20_000   # iterations per unit of the published runs
V_TRAVEL = 2.0         # how far Adam must be able to move V in one run (lr × iters)
# ... but never faster than at the CPU default: at 20 iterations 2/iters = 0.1 overfit the 8
# samples of a DenseNet-121 coverage run (output cosine 0.877; 1e-2: 0.978; RTN 0.984)
V_LR_CAP = V_TRAVEL / CPU_ITERS


def budget_lr(paper_lr: float, iters: int) -> float:
    """The learning rate that gives ``iters`` steps the step budget (lr × steps) of the
    published ``paper_lr`` × 20 000 steps — for runs shorter than the CPU default, the default's
    rate (as for V: a larger one makes a few steps jump)."""
    return paper_lr * PAPER_ITERS / max(CPU_ITERS, iters)


class AdaRoundConfig(MethodConfig):
    PAPER_LR: ClassVar[float] = 1e-3  # Adam lr of V in the published runs

    iters: int = Field(CPU_ITERS, ge=0, description="optimisation steps per unit")
    batch_size: int = Field(32, ge=1)
    lr: PositiveFloat | Literal["auto"] = Field(
        "auto", description="Adam learning rate of V; auto: max(published, min(2/iters, 1e-2))")
    round_weight: float = Field(0.01, ge=0, description="λ of the rounding regulariser")
    warmup: float = Field(0.2, ge=0, lt=1)
    b_start: float = Field(20.0, gt=0)
    b_end: float = Field(2.0, gt=0)
    cache_mb: int = Field(2048, ge=1, description="RAM for cached unit tensors; beyond: disk")

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        return {"lr": self.round_lr()} if self.lr == "auto" else {}

    def round_lr(self) -> float:
        if self.lr != "auto":
            return self.lr
        return max(self.PAPER_LR, min(V_LR_CAP, V_TRAVEL / max(1, self.iters)))

    def weight_stage(self, name: str = "weights", **kw) -> Stage:
        return Stage(name, self.iters, learn_weights=True, learn_acts=False, acts_on=False,
                     batch_size=self.batch_size, lr_round=self.round_lr(),
                     round_weight=self.round_weight, warmup=self.warmup,
                     b_range=(self.b_start, self.b_end), **kw)


def layer_units(model, example):
    return units.partition(model, example, blocks=False, max_group=1)


@register_method("adaround", AdaRoundConfig)
def apply(model, cfg: AdaRoundConfig, ctx: MethodContext) -> dict[str, Any]:
    return recon.run_stages(model, ctx, [cfg.weight_stage()], units_fn=layer_units,
                            cache_mb=cfg.cache_mb)
