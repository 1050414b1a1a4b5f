"""Fidelity of a compressed model to its float reference, for models without labels.

Each metric compares the reference model's outputs (``ref``) with the compressed model's
(``test``) on the same inputs, row by row.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from slimtorch.errors import SlimtorchError


def _check_pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two ``[N, D]`` tensors of the same shape and return them as float32."""
    if ref.shape != test.shape or ref.dim() != 2 or ref.shape[0] == 0:
        raise SlimtorchError(
            f"expected two non-empty [N, D] tensors of the same shape, got "
            f"{tuple(ref.shape)} and {tuple(test.shape)}"
        )
    return ref.detach().float(), test.detach().float()


def cosine_fidelity(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of ``ref`` and ``test`` (1.0 = identical)."""
    ref, test = _check_pair(ref, test)
    return F.cosine_similarity(ref, test, dim=1).mean().item()


def _nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def retrieval_agreement(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Fraction of rows whose top-1 neighbour (cosine, excluding itself) is the same in both."""
    ref, test = _check_pair(ref, test)
    if ref.shape[0] < 2:
        raise SlimtorchError("retrieval_agreement needs at least 2 rows")
    return (_nearest_neighbours(ref) == _nearest_neighbours(test)).float().mean().item()


def pair_top1(emb: torch.Tensor) -> float:
    """Near-duplicate retrieval accuracy of ``[2n, D]`` embeddings whose rows i and n + i are
    a pair (``data.text.eval_pairs``): the fraction of rows whose top-1 neighbour (cosine,
    excluding itself) is its partner."""
    if emb.dim() != 2 or emb.shape[0] < 2 or emb.shape[0] % 2:
        raise SlimtorchError(f"pair_top1 needs [2n, D] embeddings, got {tuple(emb.shape)}")
    n = emb.shape[0] // 2
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return (_nearest_neighbours(emb.detach().float()) == partner).float().mean().item()


def logits_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(softmax(ref) || softmax(test)) over the last dimension."""
    if ref_logits.shape != test_logits.shape or ref_logits.numel() == 0:
        raise SlimtorchError(
            f"logits must be non-empty and of the same shape, got "
            f"{tuple(ref_logits.shape)} and {tuple(test_logits.shape)}"
        )
    ref = ref_logits.detach().float().reshape(-1, ref_logits.shape[-1])
    test = test_logits.detach().float().reshape(-1, test_logits.shape[-1])
    top1 = (ref.argmax(dim=1) == test.argmax(dim=1)).float().mean().item()
    ref_logp, test_logp = F.log_softmax(ref, dim=1), F.log_softmax(test, dim=1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(dim=1).mean().item()
    return {"top1_agreement": top1, "kl": max(kl, 0.0)}
