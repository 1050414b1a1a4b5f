"""Graph rewrites that keep the float function unchanged: BN folding and MHA decomposition.

BatchNorm folding (into the preceding conv/linear, per output channel o):
    W'_o = W_o · γ_o / √(σ²_o + ε),   b'_o = β_o + (b_o − μ_o) · γ_o / √(σ²_o + ε)

The folded BN becomes ``nn.Identity`` when its class runs ``_BatchNorm.forward`` unchanged. A
subclass with its own forward (timm's ``BatchNormAct2d``: batch_norm → drop → act) keeps its
module, set to the exact identity normalisation (γ = 1, β = 0, μ = 0, σ² = 1, ε = 0, so
(x − 0)/√(1 + 0)·1 + 0 = x bit for bit), so whatever else its forward does still runs.

``nn.MultiheadAttention`` computes its projections with raw ``F.linear`` on packed weights
(and may take a fused native kernel), hiding the attention matmuls. It is rewritten into
``ExplicitMultiheadAttention``: four ``nn.Linear`` children and explicit q@kᵀ, softmax, @v, so
the ordinary layer and matmul quantizers apply. The rewrite is exact up to float rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each (layer fqn, bn fqn) pair; the BN becomes the identity (``drop_folded_bn``)."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std  # [O]
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        layer.weight.mul_(factor.reshape(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(std)
        new_bias = beta + (bias - bn.running_mean) * factor
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
        drop_folded_bn(model, bn_name)


def overrides_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module``'s class runs a forward of its own instead of ``base.forward``."""
    return type(module).forward is not base.forward


@torch.no_grad()
def drop_folded_bn(model: nn.Module, bn_name: str) -> None:
    """A folded BN: ``nn.Identity`` if its forward is plain ``_BatchNorm.forward``, otherwise
    the same module set to the exact identity normalisation (its other behaviour stays)."""
    bn = model.get_submodule(bn_name)
    if not overrides_forward(bn, _BatchNorm):
        set_submodule(model, bn_name, nn.Identity())
        return
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def is_identity_bn(bn: nn.Module) -> bool:
    """A BN left as the exact identity normalisation by ``drop_folded_bn``."""
    return (isinstance(bn, _BatchNorm) and bn.eps == 0.0 and bn.running_mean is not None
            and not bn.running_mean.any() and bool((bn.running_var == 1).all())
            and (not bn.affine or bool((bn.weight == 1).all() and not bn.bias.any())))


def apply_fold_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Reproduce the structure of folding without the arithmetic (for loading saved weights)."""
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        drop_folded_bn(model, bn_name)


class ExplicitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention written with explicit Linear layers and matmuls (same call API)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv/add_zero_attn is not "
                             "supported; it is left in float")
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        self.dropout = mha.dropout
        kdim, vdim = mha.kdim, mha.vdim
        has_bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(e, e, bias=has_bias)
        self.k_proj = nn.Linear(kdim, e, bias=has_bias)
        self.v_proj = nn.Linear(vdim, e, bias=has_bias)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in zip((self.q_proj, self.k_proj, self.v_proj), (wq, wk, wv)):
                lin.weight.copy_(w)
            if has_bias:
                for lin, b in zip((self.q_proj, self.k_proj, self.v_proj),
                                  mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self.batch_first:  # [T, B, E] -> [B, T, E]
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q, k, v = (self._heads(p(x)) for p, x in
                   ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B,H,T,S]
        scores = scores + _attention_bias(attn_mask, key_padding_mask, is_causal, scores)
        attn = scores.softmax(dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = torch.matmul(attn, v)  # [B, H, T, Dh]
        b, h, t, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))  # [B, T, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights


def _attention_bias(attn_mask, key_padding_mask, is_causal, scores: Tensor) -> Tensor:
    """Additive mask [.., T, S] from boolean/float masks (True = masked out)."""
    t, s = scores.shape[-2:]
    bias = torch.zeros(t, s, dtype=scores.dtype, device=scores.device)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(
            scores.shape[0], -1, t, s)
        bias = bias + (torch.zeros_like(m, dtype=scores.dtype).masked_fill(m, float("-inf"))
                       if m.dtype == torch.bool else m)
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
        bias = bias + (torch.zeros_like(kp, dtype=scores.dtype).masked_fill(kp, float("-inf"))
                       if kp.dtype == torch.bool else kp)
    return bias


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace every nn.MultiheadAttention by ExplicitMultiheadAttention; returns their fqns."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.MultiheadAttention) and name:
            try:
                set_submodule(model, name, ExplicitMultiheadAttention(mod))
                done.append(name)
            except ValueError:
                continue
    return done


def tied_parameters(model: nn.Module) -> list[str]:
    """Names of every parameter that is the same tensor as an earlier-named one (a tied
    lm_head / embedding), in ``named_parameters`` order, the first holder left out."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.append(name)
        seen.add(id(p))
    return out


@torch.no_grad()
def untie_parameters(model: nn.Module, names: list[str]) -> None:
    """Give each named parameter its own copy (same values): a method may then change one
    holder of a tied weight without the other. ``load`` replays it from the metadata
    (``meta["untied"]``) before the saved tensors go in."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    config = getattr(model, "config", None)  # an HF model would tie them again in tie_weights
    if names and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
