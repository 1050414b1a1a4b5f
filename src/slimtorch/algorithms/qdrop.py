"""QDrop (Wei et al., ICLR 2022): AdaRound weights and LSQ activation step sizes jointly, per
block, with randomly dropped activation quantization.

The unit input mixes element-wise: x = x_q with probability ``mix_prob`` (0.5) else x_fp; the
unit's activation quantizers keep the quantized value of each element with probability
1 − ``drop_prob`` (0.5) else pass it in float — only during reconstruction. Activation
quantizers here sit at layer inputs, so those reading the unit input directly reuse the mix mask
(their element is Q(x_q) where the mix chose x_q, else x_fp — QDrop's mixed input exactly).
Target: the float unit on x_fp. λ = 0.01 (0.1 for nets with depthwise convolutions, as in the
QDrop MobileNetV2 config) when ``round_weight: auto``.

LSQ learning rate: the published runs use Adam lr 4e-5 with cosine decay to 0 over 20 000
iterations. ``act_lr: auto`` keeps that schedule's step budget (lr × iterations, the most an
Adam-driven step size can travel) when the iteration count differs: lr = 4e-5 · 20 000 / iters —
the published value at 20 000, 4e-3 at the 200-iteration CPU default. Without it the CPU default
left the activation step sizes almost where initialisation put them (measured in
``bench/results/ptq_recon_actlr.md``). That holds for 2- and 4-bit activations. Above 4 bits
(the recipe's activation bit width) ``auto`` is the published 4e-5: MSE-initialised 6- and 8-bit
step sizes are already right, and the budget rate moved them away (ResNet-20 top-1 agreement
with float at W6A6 99.35 vs 99.65 %, at W8A8 99.51 vs 99.91 %;
``bench/results/ptq_recon_w8a8.md``).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat

from ..methods import MethodContext, register_method
from ..runner import recon
from ..runner.recon import Stage
from .adaround import AdaRoundConfig, budget_lr
from .brecq import block_units


def act_bits(recipe) -> int | None:
    """The recipe's default activation bit width (None: weights only)."""
    return recipe.activations.bits if recipe.activations is not None else None


def has_depthwise(model) -> bool:
    """MobileNet-style: any convolution with one group per input channel."""
    return any(getattr(m, "groups", 1) > 1 and m.groups == getattr(m, "in_channels", 0)
               for m in model.modules())


PAPER_ACT_LR = 4e-5    # the published LSQ learning rate at 20 000 iterations
BUDGET_MAX_ACT_BITS = 4  # act_lr auto keeps the step budget up to this many activation bits


class QDropConfig(AdaRoundConfig):
    round_weight: float | Literal["auto"] = "auto"
    act_lr: PositiveFloat | Literal["auto"] = Field(
        "auto", description="LSQ Adam lr; auto: 4e-5 · 20000 / max(iters, 200) at ≤ 4-bit "
        "activations, else 4e-5 (see module docstring)")
    mix_prob: float = Field(0.5, ge=0, le=1)
    drop_prob: float = Field(0.5, ge=0, le=1)

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        out = super().auto_values(model, ctx)
        if self.round_weight == "auto":
            out["round_weight"] = self.round_lambda(model)
        if self.act_lr == "auto":
            out["act_lr"] = self.lsq_lr(act_bits(ctx.recipe))
        return out

    def round_lambda(self, model) -> float:
        """λ: 0.1 for nets with depthwise convolutions (QDrop's MobileNetV2 config), else 0.01."""
        if self.round_weight != "auto":
            return self.round_weight
        return 0.1 if has_depthwise(model) else 0.01

    def lsq_lr(self, act_bits: int | None) -> float:
        """The LSQ learning rate for a recipe whose activations have ``act_bits`` bits."""
        if self.act_lr != "auto":
            return self.act_lr
        if act_bits is not None and act_bits > BUDGET_MAX_ACT_BITS:
            return PAPER_ACT_LR
        return budget_lr(PAPER_ACT_LR, self.iters)

    def joint_stage(self, model, act_bits: int | None = None, **kw) -> Stage:
        lam = self.round_lambda(model)
        act_lr = self.lsq_lr(act_bits)
        return Stage("joint", self.iters, learn_weights=True, learn_acts=True, acts_on=True,
                     batch_size=self.batch_size, lr_round=self.round_lr(), lr_act=act_lr,
                     round_weight=lam, warmup=self.warmup, b_range=(self.b_start, self.b_end),
                     mix_prob=self.mix_prob, drop_prob=self.drop_prob, **kw)


@register_method("qdrop", QDropConfig)
def apply(model, cfg: QDropConfig, ctx: MethodContext) -> dict[str, Any]:
    stage = cfg.joint_stage(model, act_bits(ctx.recipe))
    return recon.run_stages(model, ctx, [stage], units_fn=block_units, cache_mb=cfg.cache_mb)
