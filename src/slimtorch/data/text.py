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
