"""Agile-Quant (Shen et al., AAAI 2024, "Agile-Quant: Activation-Guided Quantization for Faster
Inference of LLMs on the Edge"): the activation side of a W4A8 LLM, on top of GPTQ weights.

What the recipe (``w4a8-agile-quant``) and this method do together:

* weights: GPTQ 4-bit (the recipe lists ``gptq`` after this method, so GPTQ's Hessians are
  collected with these activation quantizers on, as in the paper's GPTQ-based code);
* Linear inputs (q/k/v, o_proj, gate/up, down_proj): the recipe's static symmetric 8-bit
  ``per_channel(-1)`` activations (one calibrated scale per feature); embeddings, the LM head
  and the norms stay float (``quantize_embeddings: false``, ``last_layer: null``);
* attention operands (every ``sdpa`` functional site): Q, K and V get one static symmetric
  8-bit scale per head (``per_channel(1)`` of [batch, heads, tokens, head_dim]);
* attention probabilities: a ``log2`` quantizer, x̂ = 2^−k, k = round(−log2 x) clipped to
  [0, 2^b − 1] with b = ``softmax_bits`` (4), 0 beyond (``quant/log2.py``: the zero branch
  keeps causally masked probabilities at 0).

Conscious deviation: the paper's description (and METHODS.md) quantizes Q and K *before* the
rotary embedding (the q_proj/k_proj outputs). Here they are quantized where the attention
matmul reads them, after RoPE, which is the tensor an integer Q·Kᵀ kernel multiplies; a
pre-RoPE grid would still need a float (or re-quantized) rotation before the matmul.

The paper's TRIP factors (per-channel refinements of one layer-wise scale, folded into the
weights) are represented by the per-channel activation scales themselves: the same grid up to
where the scale lives. The public code was not found in our search corpus; the paper text is
followed. Token pruning (``prune_ratio`` β > 0, from layer ``prune_from``): ``agile_prune.py``;
it is installed after the activation ranges are calibrated (on every token) and is active in
the methods that follow (GPTQ then sees the pruned sequences in the later layers).
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from ..methods import MethodConfig, MethodContext, register_method
from ..quant.functional import SITE_ROLES
from ..quant.granularity import PerChannel
from ..quant.prepare import META_ATTR
from .agile_prune import install_pruning, pruning_plan
from .vit_sites import observe_only, post_softmax_slots, sites_of, swap_site_quantizer

HEAD_AXIS = 1  # SDPA operands are [batch, heads, tokens, head_dim]


class AgileQuantConfig(MethodConfig):
    softmax_bits: int = Field(4, ge=2, le=8, description="bits of the log2 softmax quantizer")
    per_head_qkv: bool = Field(True, description="one static scale per head for Q, K, V")
    prune_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="β: fraction of the tokens "
                               "pruned by the last layer (0: no token pruning)")
    prune_from: int | Literal["mid"] = Field("mid", description="first decoder layer that "
                                             "prunes (index, or 'mid' = n_layers // 2)")


def sdpa_slots(model) -> list[tuple[str, int]]:
    """(site key, role index) of the q, k, v quantizers of every SDPA site of the model."""
    meta, sites = getattr(model, META_ATTR), sites_of(model)
    if sites is None:
        return []
    roles = SITE_ROLES["sdpa"]
    return [(s["key"], roles.index(r)) for s in meta["graph"]["functional"]
            if s["kind"] == "sdpa" and sites.site(s["key"]) is not None for r in ("q", "k", "v")]


@register_method("agile_quant", AgileQuantConfig)
def apply(model, cfg: AgileQuantConfig, ctx: MethodContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    swapped = [swap_site_quantizer(model, k, i, "log2", bits=cfg.softmax_bits)
               for k, i in post_softmax_slots(model)]
    stats: dict[str, Any] = {"log2_softmax_sites": len(swapped), "per_head_qkv": 0}
    if cfg.per_head_qkv:
        heads = [swap_site_quantizer(model, k, i, granularity=PerChannel(HEAD_AXIS))
                 for k, i in sdpa_slots(model)]
        swapped += heads
        stats["per_head_qkv"] = len(heads)
    observe_only(model, ctx.batches, swapped)  # float pass, like the recipe's calibration
    if cfg.prune_ratio > 0:  # after calibration: the activation ranges see every token
        plan = pruning_plan(model, cfg.prune_ratio, cfg.prune_from)
        getattr(model, META_ATTR)["token_pruning"] = plan
        install_pruning(model, plan)
        stats["token_pruning"] = plan
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats
