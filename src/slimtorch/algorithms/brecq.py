"""BRECQ (Li et al., ICLR 2021): AdaRound per block, then LSQ activation step sizes per block.

Stage 1 reconstructs each unit's output (a residual block, or a single layer) with AdaRound,
activation quantization off in the whole model; the unit input is the quantized model's input
("asym"), the target the float unit's output on the float input. Stage 2 switches activation
quantization on and learns the step sizes (LSQ, gradient scale 1/√(numel·q_max)) of the unit's
activation quantizers on the Lp error (p = 2.4), Adam with cosine decay to 0 — as BRECQ's
``main_imagenet.py`` does. The Fisher-weighted loss is not used (the published script passes
``opt_mode='mse'``).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from ..methods import MethodContext, register_method
from ..runner import recon, units
from ..runner.recon import Stage
from .adaround import AdaRoundConfig


class BRECQConfig(AdaRoundConfig):
    act_iters: int = Field(100, ge=0, description="steps per unit of the activation stage")
    act_lr: float = Field(4e-4, gt=0)
    act_p: float = Field(2.4, gt=0, description="Lp exponent of the activation stage loss")


def block_units(model, example):
    return units.partition(model, example, blocks=True, max_group=3)


@register_method("brecq", BRECQConfig)
def apply(model, cfg: BRECQConfig, ctx: MethodContext) -> dict[str, Any]:
    stages = [cfg.weight_stage()]
    if ctx.recipe.activations is not None and cfg.act_iters > 0:
        stages.append(Stage("acts", cfg.act_iters, learn_weights=False, learn_acts=True,
                            acts_on=True, batch_size=cfg.batch_size, lr_act=cfg.act_lr,
                            rec_p=cfg.act_p))
    return recon.run_stages(model, ctx, stages, units_fn=block_units, cache_mb=cfg.cache_mb)
