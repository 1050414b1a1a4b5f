"""Which module is running, and how many times each functional op has been called in it.

Functional sites (an activation×activation matmul, a scaled_dot_product_attention call) have
no module of their own. They are named ``"{module fqn}:{kind}:{n}"``: the innermost module whose
forward is running, the op kind, and the call's index among calls of that kind during that
module's current invocation. Capture and the quantized runtime count the same way, so the name
found at capture finds the quantizers at run time.

Modules of the ``opaque`` types (the quantizers themselves) are entered too, but calls made
while one of them runs are not counted: their arithmetic (``x / s + z``...) does not exist at
capture time and must not shift the count of the model's own adds.

The tracker installs forward hooks on one model's modules (never global hooks) and removes
them with ``close()``.
"""
from __future__ import annotations

from collections import Counter
from functools import partial

from torch import nn

# functions whose calls are counted to name functional sites
FUNCTIONAL_KINDS = {
    "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "bmm": "matmul",
    "mm": "matmul", "scaled_dot_product_attention": "sdpa",
    "add": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add", "add_": "add",
}
SITE_KINDS = frozenset(FUNCTIONAL_KINDS.values())


class ModuleTracker:
    """Keeps the stack of running modules of ``model`` with per-invocation op counters."""

    def __init__(self, model: nn.Module, opaque: tuple[type, ...] = ()):
        self.stack: list[tuple[str, Counter | None]] = []
        self.opaque = opaque
        self.handles = []
        for name, mod in model.named_modules():
            # hooks are bound methods (no closures): ``copy.deepcopy`` of the model then
            # re-binds them to the copied tracker instead of the original one
            self.handles.append(mod.register_forward_pre_hook(partial(self._enter, name)))
            self.handles.append(mod.register_forward_hook(self._exit, always_call=True))

    def _enter(self, name: str, module, args) -> None:
        opaque = isinstance(module, self.opaque) or (self.stack and self.stack[-1][1] is None)
        self.stack.append((name, None if opaque else Counter()))

    def _exit(self, module, args, output):
        if self.stack:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def next_key(self, kind: str) -> str | None:
        """Name of the next call of ``kind`` in the current module (None inside an opaque
        module)."""
        if not self.stack:
            return f":{kind}:0"
        name, counts = self.stack[-1]
        if counts is None:
            return None
        key = f"{name}:{kind}:{counts[kind]}"
        counts[kind] += 1
        return key

    def reset(self) -> None:
        self.stack.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stack.clear()
