"""PD-Quant (Liu et al., CVPR 2023): QDrop plus a prediction-difference loss and distribution
correction of the calibration activations (formulas in ``pd.py``).

Per step, 2×batch inputs go through the unit: the QDrop mix (reconstruction loss against the
float unit on the DC-corrected input) and the pure quantized input, whose output is pushed
through the rest of the network in float for L_pd = KL(softmax(z_fp/T) ‖ softmax(z_q/T))/λ_r.
Total: L_rec + λ·L_round + L_pd; Adam lr 3e-3 on V (floored at 2/iters for short CPU runs,
``adaround.AdaRoundConfig.round_lr``). ``auto`` settings follow the published run
script: nets with depthwise convolutions (MobileNet-style) use T = 1, λ = 0.1, λ_c = 0.005;
others T = 4, λ = 0.01, λ_c = 0.02.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ..methods import MethodContext, register_method
from ..runner import recon
from .brecq import block_units
from .pd import PDSettings, PDTerm
from .qdrop import QDropConfig, act_bits, has_depthwise


class PDQuantConfig(QDropConfig):
    PAPER_LR: ClassVar[float] = 3e-3  # PD-Quant's Adam lr of V (BRECQ/QDrop: 1e-3)

    temperature: float | Literal["auto"] = "auto"
    pd_weight: float = Field(10.0, ge=0, description="1/λ_r")
    dc_steps: int = Field(10, ge=0, description="Adam steps of distribution correction "
                          "(paper: 500; CPU default by measurement, see adaround.CPU_ITERS)")
    dc_lr: float = Field(1e-3, gt=0)
    lambda_c: float | Literal["auto"] = "auto"
    dc_batch: int = Field(256, ge=1)

    def auto_values(self, model, ctx: MethodContext) -> dict[str, Any]:
        out = super().auto_values(model, ctx)
        pd = self.settings(model)
        if self.temperature == "auto":
            out["temperature"] = pd.temperature
        if self.lambda_c == "auto":
            out["lambda_c"] = pd.lambda_c
        return out

    def term(self, model) -> PDTerm:
        """DC + prediction-difference loss, plugged into the QDrop stage."""
        return PDTerm(self.settings(model), self.batch_size)

    def settings(self, model) -> PDSettings:
        dw = has_depthwise(model)
        t = (1.0 if dw else 4.0) if self.temperature == "auto" else self.temperature
        lc = (0.005 if dw else 0.02) if self.lambda_c == "auto" else self.lambda_c
        return PDSettings(t, self.pd_weight, self.dc_steps, self.dc_lr, lc, self.dc_batch)


@register_method("pdquant", PDQuantConfig)
def apply(model, cfg: PDQuantConfig, ctx: MethodContext) -> dict[str, Any]:
    stage = cfg.joint_stage(model, act_bits(ctx.recipe), terms=(cfg.term(model),))
    return recon.run_stages(model, ctx, [stage], units_fn=block_units, cache_mb=cfg.cache_mb)
