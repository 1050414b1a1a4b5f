"""QDrop (Wei et al., ICLR 2022): AdaRound weights and LSQ activation step sizes jointly, per
block, with randomly dropped activation quantization.

The unit input mixes element-wise: x = x_q with probability ``mix_prob`` (0.5) else x_fp; the
unit's activation quantizers keep the quantized value of each element with probability
1 − ``drop_prob`` (0.5) else pass it in float — only during reconstruction. Activation
quantizers here sit at layer inputs, so those reading the unit input directly reuse the mix mask
(their element is Q(x_q) where the mix chose x_q, else x_fp — QDrop's mixed input exactly).
Target: the float unit on x_fp. λ = 0.01 (0.1 for nets with depthwise convolutions, as in the
QDrop MobileNetV2 config) when ``round_weight: auto``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from . import recon
from .adaround import AdaRoundConfig
from .brecq import block_units
from .recon import Stage


def has_depthwise(model) -> bool:
    """MobileNet-style: any convolution with one group per input channel."""
    return any(getattr(m, "groups", 1) > 1 and m.groups == getattr(m, "in_channels", 0)
               for m in model.modules())


class QDropConfig(AdaRoundConfig):
    round_weight: float | Literal["auto"] = "auto"
    act_lr: float = Field(4e-5, gt=0)
    mix_prob: float = Field(0.5, ge=0, le=1)
    drop_prob: float = Field(0.5, ge=0, le=1)

    def joint_stage(self, model, **kw) -> Stage:
        lam = self.round_weight
        if lam == "auto":
            lam = 0.1 if has_depthwise(model) else 0.01
        return Stage("joint", self.iters, learn_weights=True, learn_acts=True, acts_on=True,
                     batch_size=self.batch_size, lr_round=self.lr, lr_act=self.act_lr,
                     round_weight=lam, warmup=self.warmup, b_range=(self.b_start, self.b_end),
                     mix_prob=self.mix_prob, drop_prob=self.drop_prob, **kw)


def apply(model, recipe, batches, *, seed: int = 0, progress: bool = False,
          float_model=None, work_dir=None) -> dict[str, Any]:
    cfg = QDropConfig.parse(recipe.method_args, "qdrop")
    return recon.run_stages(model, recipe, batches, [cfg.joint_stage(model)], seed=seed,
                            progress=progress, float_model=float_model, work_dir=work_dir,
                            units_fn=block_units, cache_mb=cfg.cache_mb)
