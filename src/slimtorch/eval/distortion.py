"""Output distortion against the unmodified model: δ = mean over samples of ‖f(x) − f'(x)‖²,
what the rate–distortion allocations (``sparsity.rd``, ``prune.rd``) measure for every layer or
group at every candidate level. The model's output may be logits or any tuple/dict/ModelOutput
of tensors (every floating tensor, flattened per sample and concatenated)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import SlimtorchError
from ..graph.capture import call_model


def flat_output(out: Any) -> Tensor:
    """Every floating tensor of a model output, flattened per sample and concatenated."""
    if isinstance(out, Tensor):
        return out.float().reshape(out.shape[0], -1)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [flat_output(o) for o in out if isinstance(o, (Tensor, dict, list, tuple))]
        parts = [p for p in parts if p.numel()]
        if parts:
            return torch.cat(parts, 1)
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        return flat_output(out.to_tuple())
    raise SlimtorchError(f"the rate-distortion allocation measures the distortion of the "
                         f"model's output, which is a {type(out).__name__} with no tensor: "
                         "return the logits")


def take_samples(batches: list, samples: int) -> tuple[list, int]:
    """The first calibration batches holding at least ``samples`` inputs, and their count."""
    out, n = [], 0
    for b in batches:
        out.append(b)
        n += len(b) if isinstance(b, Tensor) else 1
        if n >= samples:
            break
    return out, n


class OutputDistortion:
    """Holds the reference outputs of ``model`` on ``batches``; calling it measures δ of the
    model as it is now (mutated in place by the caller)."""

    def __init__(self, model, batches: list, samples: int):
        self.model = model
        self.batches, self.n = take_samples(batches, samples)
        with torch.no_grad():
            self.ref = [flat_output(call_model(model, b)) for b in self.batches]

    @torch.no_grad()
    def __call__(self) -> float:
        return sum(((flat_output(call_model(self.model, b)) - r) ** 2).sum().item()
                   for b, r in zip(self.batches, self.ref)) / self.n
