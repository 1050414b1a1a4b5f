"""Agile-Quant's activation-guided token pruning (Shen et al., AAAI 2024, "Activation-Guided
Optimization" and "Regulation of Token Pruning").

Score. The paper: "we only adopt their attentivity to the first start token for the importance
measuring" — the attention *of* each token *to* the start token, the vertical stripe of its
Figure 1. In a causal LM the other reading (the start token's attention to token i, A[h, 0, i])
is zero for every i > 0, so the paper's text leaves one choice:

    score_i = Σ_h A[h, i, 0]        (A: this layer's softmax(Q·Kᵀ/√d + mask), [heads, T, T])

and the tokens with the *lowest* scores are dropped. The public code was not found in our
search corpus; this follows the text (and METHODS.md). A is recomputed in the pruning layer
from the Q and K its ``scaled_dot_product_attention`` call receives (after RoPE, before their
8-bit grid; GQA key heads repeated); the start token (position 0) is never dropped.

Where. From decoder layer ``prune_from`` ('mid': n_layers // 2) to the last, m layers; each
keeps the fraction (1 − γ) of its tokens, γ = 1 − (1 − β)^(1/m), so that (1 − γ)^m = 1 − β of
the sequence survives the last layer (the paper sets β "at the last layer"; its formula is
not in the text we hold, this is the one that reaches β). Counts: after the j-th pruning layer
round(T·(1 − β)^(j/m)) tokens (at least 1). The paper drops tokens after the attention
residual; they are dropped here at the output of the same layer, after its MLP. The MLP acts
on each token alone, so every surviving token's values are the same either way (the dropped
tokens' MLP is computed once more than needed: the speed-up is not the point here).

How (HF decoder layers, found as the ModuleList element holding each SDPA site): forward hooks
on the pruning layers gather the hidden states of the kept tokens; forward pre-hooks on every
later layer slice what the model computed once for the full sequence — ``position_embeddings``
(cos, sin), ``position_ids``, ``attention_mask`` (rows and columns) — by the same kept indices
(sorted, so causal order and a causal ``is_causal`` SDPA stay right). The last layer's output
is put back at full length: each dropped token carries its hidden state from the layer that
dropped it, so the model's output shape is unchanged, and ``TokenPruner.kept`` ([B, T] bool)
says which positions survived. Only those positions' predictions mean anything: perplexity is
scored on them, paired with the unpruned model on the same positions (``eval/tasks.py``).
Meant for one full-sequence forward (evaluation, prefill): generation with a KV cache is not
pruned consistently. The hooks act only inside a forward of the whole model. Known
imperfection: GPTQ listed after ``agile_quant`` feeds each unit either from the previous unit's
cached output (layers called one at a time: unpruned) or from a run of the model's prefix
(pruned in the pruning layers), so in those layers its Hessians mix both.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import RecipeError
from ..quant.functional import sdpa_probs
from ..quant.prepare import META_ATTR

PRUNER_ATTR = "slimtorch_token_pruner"


def layer_ratio(beta: float, m: int) -> float:
    """γ = 1 − (1 − β)^(1/m): per-layer pruning ratio whose m layers prune β overall."""
    return 1.0 - (1.0 - beta) ** (1.0 / m)


def keep_counts(t: int, beta: float, m: int) -> list[int]:
    """Tokens left after each of the m pruning layers, for a sequence of ``t`` tokens."""
    out, n = [], t
    for j in range(1, m + 1):
        n = min(n, max(1, round(t * (1.0 - beta) ** (j / m))))
        out.append(n)
    return out


def decoder_blocks(model: nn.Module) -> list[str]:
    """The repeated blocks holding the model's attention: for each SDPA site of the captured
    graph, its ancestor that is an element of an ``nn.ModuleList``, in order."""
    meta = getattr(model, META_ATTR, None) or {}
    keys = [s["key"] for s in meta.get("graph", {}).get("functional", []) if s["kind"] == "sdpa"]
    blocks: list[str] = []
    for key in keys:
        parts = key.split(":")[0].split(".")
        for i in range(len(parts), 0, -1):
            parent = model.get_submodule(".".join(parts[: i - 1]))
            if isinstance(parent, nn.ModuleList):
                if ".".join(parts[:i]) not in blocks:
                    blocks.append(".".join(parts[:i]))
                break
    if not blocks:
        raise RecipeError("token pruning needs attention computed by "
                          "F.scaled_dot_product_attention inside repeated blocks (an "
                          "nn.ModuleList of decoder layers; HF: attn_implementation='sdpa'), "
                          "and none was captured: set prune_ratio: 0")
    return blocks


def pruning_plan(model: nn.Module, beta: float, prune_from: int | str) -> dict[str, Any]:
    """Plain data: the blocks, the first pruning block, β and γ (kept in the artifact)."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    start = n // 2 if prune_from == "mid" else int(prune_from)
    if not 0 <= start < n:
        raise RecipeError(f"prune_from {prune_from!r} is not a decoder layer index of this "
                          f"model (0..{n - 1}), use 'mid' or an index in that range")
    return {"blocks": blocks, "prune_from": start, "ratio": beta,
            "layer_ratio": layer_ratio(beta, n - start), "score": "sum_h A[h, i, 0]"}


def _take(x: Tensor, idx: Tensor, axis: int) -> Tensor:
    """x's entries at token indices ``idx`` [B, k] along ``axis`` (batch at axis 0; a batch
    of 1 is broadcast)."""
    b, k = idx.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[axis] = b, k
    size = list(x.shape)
    size[axis] = k
    return torch.gather(x, axis, idx.reshape(shape).expand(size))


def _slice_kwargs(kwargs: dict, idx: Tensor, t: int) -> dict:
    """The full-sequence inputs of a decoder layer restricted to the kept tokens ``idx``."""
    out = dict(kwargs)
    pe = kwargs.get("position_embeddings")
    if isinstance(pe, (tuple, list)):
        out["position_embeddings"] = type(pe)(_take(p, idx, 1) if p.shape[1] == t else p
                                              for p in pe)
    pos = kwargs.get("position_ids")
    if isinstance(pos, Tensor) and pos.dim() == 2 and pos.shape[1] == t:
        out["position_ids"] = _take(pos, idx, 1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[-1] == t:
        out["attention_mask"] = _take(_take(mask, idx, 2), idx, 3)  # [B, 1, k, k]
    elif isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == t:
        out["attention_mask"] = _take(mask, idx, 1)
    if isinstance(kwargs.get("cache_position"), Tensor):
        raise RecipeError("token pruning cannot slice `cache_position` per batch row; use a "
                          "model whose decoder layers take position_ids / position_embeddings")
    return out


class _StartScores(TorchFunctionMode):
    """Inside one block: Σ_h A[h, i, 0] of each SDPA call, [B, T]."""

    def __init__(self):
        super().__init__()
        self.scores: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if q.shape[-3] != k.shape[-3]:  # GQA: repeat key heads
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            with torch.no_grad():
                a = sdpa_probs(q.float(), k.float(), mask, kwargs.get("is_causal", False),
                               kwargs.get("scale"))                 # [B, H, T, S]
                s = a[..., 0].sum(1)                                # [B, T]
            self.scores = s if self.scores is None else self.scores + s
        return func(*args, **kwargs)


class TokenPruner:
    """The hooks of one model's token pruning (module docstring); ``kept`` after a forward."""

    def __init__(self, model: nn.Module, plan: dict[str, Any]):
        self.plan, self.enabled = plan, True
        self.blocks = plan["blocks"]
        self.start = plan["prune_from"]
        self.kept: Tensor | None = None
        self.scores: dict[int, Tensor] = {}  # block index -> its scores [B, k], last forward
        self._root = False  # inside a forward of the whole model
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]
        for i, fqn in enumerate(self.blocks):
            mod = model.get_submodule(fqn)
            self._handles += [
                mod.register_forward_pre_hook(partial(self._pre, i), with_kwargs=True),
                mod.register_forward_hook(partial(self._post, i), always_call=True)]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The same model without token pruning inside the block."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # ---------------------------------------------------------------- hooks
    def _enter(self, module, args):
        self._root, self.kept, self.scores = True, None, {}
        self._idx, self._full, self._mode = None, None, None

    def _exit(self, module, args, out):
        self._root = False
        if self._mode is not None:  # an exception inside a pruning block
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _pre(self, i: int, module, args, kwargs):
        if not (self.enabled and self._root):
            return None
        if i == 0:
            self._t = args[0].shape[1]
            self._counts = keep_counts(self._t, self.plan["ratio"], len(self.blocks) - self.start)
        if i >= self.start:
            self._mode = _StartScores()
            self._mode.__enter__()
        if self._idx is None:
            return None
        return args, _slice_kwargs(kwargs, self._idx, self._t)

    def _post(self, i: int, module, args, out):
        if not (self.enabled and self._root) or i < self.start:
            return None
        mode, self._mode = self._mode, None
        if mode is None:
            return None
        mode.__exit__(None, None, None)
        if out is None:  # the block raised (always_call): nothing to prune
            return None
        h = out[0] if isinstance(out, tuple) else out                  # [B, k, D]
        b = h.shape[0]
        idx = self._idx if self._idx is not None else torch.arange(
            self._t, device=h.device).expand(b, -1)                    # [B, k] token positions
        if mode.scores is None:
            raise RecipeError(f"token pruning saw no scaled_dot_product_attention call in "
                              f"{self.blocks[i]!r}: run the model with attn_implementation='sdpa'")
        full = h.new_zeros(b, self._t, h.shape[-1]) if self._full is None else self._full
        self._full = full.scatter(1, idx[..., None].expand_as(h), h)   # dropped ones stay
        self.scores[i] = mode.scores
        score = mode.scores.masked_fill(idx == 0, float("inf"))        # never the start token
        n = self._counts[i - self.start]
        sel = score.topk(n, dim=1).indices.sort(dim=1).values          # [B, n], in order
        self._idx = torch.gather(idx, 1, sel)
        h = _take(h, sel, 1)
        if i == len(self.blocks) - 1:  # back to full length; kept says who survived
            h = self._full.scatter(1, self._idx[..., None].expand_as(h), h)
            self.kept = torch.zeros(b, self._t, dtype=torch.bool, device=h.device)
            self.kept.scatter_(1, self._idx, True)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def install_pruning(model: nn.Module, plan: dict[str, Any]) -> TokenPruner:
    """Hook ``model``'s blocks per ``plan`` (``pruning_plan``); replaces an earlier pruner."""
    remove_pruning(model)
    pruner = TokenPruner(model, plan)
    object.__setattr__(model, PRUNER_ATTR, pruner)
    return pruner


def pruner_of(model: nn.Module) -> TokenPruner | None:
    return getattr(model, PRUNER_ATTR, None)


def remove_pruning(model: nn.Module) -> None:
    """Take ``model``'s token pruning hooks off (the model runs every token again)."""
    old = model.__dict__.pop(PRUNER_ATTR, None)
    if old is not None:
        old.remove()
