""""The rest of the network in float" from a unit's output — PD-Quant's prediction path
(Liu et al., CVPR 2023, Sec. 3.2: z_q = the logits when the unit's quantized output is pushed
through the later, not yet reconstructed layers with quantization off).

Generic for any model whose forward we cannot split: the whole model runs in float with the
unit's ``forward`` replaced by "return this tensor". Everything that ran *before* the unit (the
float prefix) would be recomputed on every step although its values cannot matter — unless the
suffix reads one of them (a long skip connection). ``SuffixRunner`` therefore also replaces the
modules that finished before the unit started (the siblings of the unit and of its ancestors,
each run once per forward) by NaN placeholders of their recorded output shape, and keeps that
shortcut only if, on one real batch, it gives bit-for-bit the logits of the full recompute (a
suffix that reads a placeholder would produce NaN or different numbers). Otherwise it recomputes
the prefix on every step (``mode == "recompute"``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..graph.capture import call_model
from ..quant.prepare import quant_state


def _placeholder(v: Any) -> Any:
    if isinstance(v, Tensor):
        return torch.full_like(v, float("nan")) if v.is_floating_point() else v.clone()
    return v


@contextmanager
def _replaced(mods: dict[nn.Module, Any]):
    """Temporarily make each module return (a fresh copy of) a fixed output."""
    for m, out in mods.items():
        m.forward = lambda *a, _o=out, **k: tree_map(_placeholder, _o)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _is_ancestor(anc: str, name: str) -> bool:
    return anc == "" or name.startswith(anc + ".")


@torch.no_grad()
def prefix_modules(model: nn.Module, unit_mod: nn.Module, item: Any) -> dict[nn.Module, Any]:
    """Modules that finish before ``unit_mod`` starts, whose parent is an ancestor of the unit,
    called exactly once per forward and under one name; with their (detached) outputs on
    ``item``."""
    names: dict[nn.Module, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, []).append(n)
    unit_name = names[unit_mod][0]
    state = {"started": False}
    before: dict[nn.Module, Any] = {}
    calls: dict[nn.Module, int] = {}

    def post(m, a, out):
        calls[m] = calls.get(m, 0) + 1
        if not state["started"]:
            before[m] = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)

    def pre(m, a):
        state["started"] = True

    hooks = [m.register_forward_hook(post) for m in names if m is not model]
    hooks.append(unit_mod.register_forward_pre_hook(pre))
    try:
        with quant_state(model, weights=False, acts=False):
            call_model(model, item)
    finally:
        for h in hooks:
            h.remove()
    return {m: out for m, out in before.items()
            if len(names[m]) == 1 and calls[m] == 1
            and _is_ancestor(names[m][0].rpartition(".")[0], unit_name)
            and not _is_ancestor(names[m][0], unit_name)}


class SuffixRunner:
    """Model logits in float when ``unit_mod`` outputs a given tensor (see module doc)."""

    def __init__(self, model: nn.Module, unit_mod: nn.Module, item: Any, unit_out: Tensor):
        self.model, self.unit_mod, self.skip = model, unit_mod, {}
        skip = prefix_modules(model, unit_mod, item)
        slow = self.recompute(unit_out, item)
        with torch.no_grad(), _replaced(skip):
            fast = self._run(unit_out, item)
        ok = torch.equal(fast, slow) and not torch.isnan(fast).any()
        self.skip = skip if ok else {}
        self.mode = ("no prefix" if not skip else f"skip prefix ({len(skip)} modules)" if ok
                     else "recompute")

    def _run(self, unit_out: Tensor, item: Any) -> Tensor:
        self.unit_mod.forward = lambda *a, **k: unit_out
        try:
            with quant_state(self.model, weights=False, acts=False):
                return call_model(self.model, item)
        finally:
            del self.unit_mod.forward

    def recompute(self, unit_out: Tensor, item: Any) -> Tensor:
        """Reference path: the float prefix is computed again."""
        return self._run(unit_out, item)

    def __call__(self, unit_out: Tensor, item: Any) -> Tensor:
        """``item`` must have the batch size of the item the runner was built with when the
        prefix is skipped (the placeholders have that shape)."""
        with _replaced(self.skip):
            return self._run(unit_out, item)
