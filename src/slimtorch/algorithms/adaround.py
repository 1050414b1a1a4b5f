"""AdaRound (Nagel et al., ICML 2020): learn each weight's rounding direction, layer by layer.

W̃ = s·(clip(⌊W/s⌋ + h(V) + z, q_min, q_max) − z), h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1), ζ = 1.1,
γ = −0.1, V initialised so h(V) = frac(W/s). Per layer, minimise
‖layer(x_q) − layer_fp(x_fp)‖² + λ·Σ(1 − |2h(V) − 1|^β) with Adam on V; the regulariser is off
for the first 20 % of the steps, then β decays linearly 20 → 2; hard rounding at the end.
Activation quantization stays off during the weight search (its calibrated ranges are kept).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from . import recon
from .config import MethodConfig
from .recon import Stage

# CPU default of every reconstruction method (papers: 20 000 per unit, `method_args: {iters:
# 20000}`). Chosen by measurement: PD-Quant, the costliest method, W2A2 on zoo ResNet-20, 1 thread
# on the shared 2-core machine (load ≈ 2.7): ≈ 1.06 s per iteration summed over its 11 units
# and ≈ 8.3 s per distribution-correction step (all units, 1024 images); 100 iterations and 10
# DC steps gave 88.17 % top-1 (float 93.14, RTN 72.40) in 218 s of calibration; 200 iterations
# + 10 DC steps (this default) gave 88.65 % in 309 s (bench/ptq_recon.py, seed 0, load ≈ 3.7).
# The paper setting (20 000 + 500 DC steps) costs ≈ 6 h + 1 h there.
CPU_ITERS = 200


class AdaRoundConfig(MethodConfig):
    iters: int = Field(CPU_ITERS, ge=0, description="optimisation steps per unit")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of V")
    round_weight: float = Field(0.01, ge=0, description="λ of the rounding regulariser")
    warmup: float = Field(0.2, ge=0, lt=1)
    b_start: float = Field(20.0, gt=0)
    b_end: float = Field(2.0, gt=0)
    cache_mb: int = Field(2048, ge=1, description="RAM for cached unit tensors; beyond: disk")

    def weight_stage(self, name: str = "weights", **kw) -> Stage:
        return Stage(name, self.iters, learn_weights=True, learn_acts=False, acts_on=False,
                     batch_size=self.batch_size, lr_round=self.lr,
                     round_weight=self.round_weight, warmup=self.warmup,
                     b_range=(self.b_start, self.b_end), **kw)


def layer_units(model, example):
    return recon.partition(model, example, blocks=False, max_group=1)


def apply(model, recipe, batches, *, seed: int = 0, progress: bool = False,
          float_model=None, work_dir=None) -> dict[str, Any]:
    cfg = AdaRoundConfig.parse(recipe.method_args, "adaround")
    return recon.run_stages(model, recipe, batches, [cfg.weight_stage()], seed=seed,
                            progress=progress, float_model=float_model, work_dir=work_dir,
                            units_fn=layer_units, cache_mb=cfg.cache_mb)
