"""Public-domain English sentences shipped with slimtorch, and tokenised batches of them.

``data/text/austen_sentences.txt`` holds 4000 sentences from Jane Austen's novels (written by
``scripts/extract_austen.py``). The first 1000 are the "calib" pool (calibration data for
post-training quantization), the remaining 3000 the "eval" pool (fidelity measurement); the two
never overlap. ``eval_pairs`` adds to eval sentences their near-duplicates (every fourth word
dropped), so retrieval on the eval set has a right answer: a sentence's partner.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from slimtorch.errors import DatasetNotFoundError, SlimtorchError

SENTENCES_PATH = Path(__file__).resolve().parent / "text" / "austen_sentences.txt"
CALIB_SIZE = 1000
SPLITS = ("calib", "eval")


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """Every sentence of the shipped file, in file order, without the ``#`` header lines."""
    if not SENTENCES_PATH.exists():
        raise DatasetNotFoundError(
            f"{SENTENCES_PATH} is missing: reinstall slimtorch or run scripts/extract_austen.py"
        )
    lines = SENTENCES_PATH.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line.strip() and not line.startswith("#"))


def load_sentences(split: str = "calib", n: int | None = None) -> list[str]:
    """The first ``n`` sentences (all if ``None``) of the "calib" or "eval" pool."""
    if split not in SPLITS:
        raise SlimtorchError(f"unknown text split {split!r}: use one of {', '.join(SPLITS)}")
    sentences = _all_sentences()
    pool = sentences[:CALIB_SIZE] if split == "calib" else sentences[CALIB_SIZE:]
    if n is not None:
        if n < 0 or n > len(pool):
            raise SlimtorchError(f"n={n} is out of range: the {split!r} pool has {len(pool)} sentences")
        pool = pool[:n]
    return list(pool)


def near_duplicate(sentence: str) -> str:
    """``sentence`` with every fourth word dropped (unchanged below four words)."""
    return " ".join(w for i, w in enumerate(sentence.split()) if i % 4 != 3)


def eval_pairs(n: int) -> list[str]:
    """The first ``n`` eval sentences, then their near-duplicates: rows i and n + i are a
    pair."""
    sentences = load_sentences("eval", n)
    return sentences + [near_duplicate(s) for s in sentences]


def text_batches(
    tokenizer: Any, sentences: list[str], batch_size: int = 32, max_length: int = 128
) -> list[dict[str, Any]]:
    """Tokenise ``sentences`` into batches of ``input_ids``/``attention_mask``/``token_type_ids``.

    Each batch is padded to its longest sentence and truncated at ``max_length`` tokens.
    """
    if batch_size < 1:
        raise SlimtorchError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[start : start + batch_size]),
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


LM_SPLITS = ("calib", "eval")


@lru_cache(maxsize=2)
def lm_text(split: str) -> str:
    """Running text for language-model perplexity: ``calib`` (Mansfield Park, Emma) or
    ``eval`` (Persuasion) -- disjoint novels (``scripts/extract_austen.py --lm``)."""
    if split not in LM_SPLITS:
        raise SlimtorchError(f"unknown text split {split!r}: use one of {', '.join(LM_SPLITS)}")
    path = SENTENCES_PATH.parent / f"austen_lm_{split}.txt"
    if not path.exists():
        raise DatasetNotFoundError(f"{path} is missing: reinstall slimtorch or run "
                                   "scripts/extract_austen.py --lm")
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("# source:"))


def token_segments(tokens: Any, seq_len: int, n: int, seed: int | None) -> Any:
    """``n`` windows of ``seq_len`` tokens from the 1-D token tensor ``tokens``: consecutive
    non-overlapping windows from the start (``seed=None``: evaluation), or seeded random
    offsets (calibration, as GPTQ samples its segments). ``[n, seq_len]``."""
    import torch
    if seq_len < 2 or n < 1:
        raise SlimtorchError(f"need seq_len >= 2 and at least one window (got {seq_len}, {n})")
    if seed is None:
        if n * seq_len > tokens.numel():
            raise SlimtorchError(f"the text has {tokens.numel()} tokens, fewer than {n} windows "
                                 f"of {seq_len}: ask for fewer or shorter windows")
        return tokens[: n * seq_len].reshape(n, seq_len)  # [n, T]
    if seq_len > tokens.numel():
        raise SlimtorchError(f"the text has {tokens.numel()} tokens, fewer than seq_len "
                             f"{seq_len}: use a shorter sequence length")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])  # [n, T]
