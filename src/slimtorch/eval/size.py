"""Model size in bytes: what the float weights cost and what the artifact's tensors cost."""
from __future__ import annotations

from torch import nn


def fp_size_bytes(model: nn.Module) -> int:
    """Bytes of the float model's state (parameters and buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_size_bytes(qmodel: nn.Module) -> int:
    """Bytes of the tensors a saved artifact holds (bit-packed integer weights, scales,
    zero-points and the float tensors that stay float); excludes the small JSON header."""
    from ..export.artifact import artifact_tensors
    state, _ = artifact_tensors(qmodel)
    return sum(t.numel() * t.element_size() for t in state.values())
