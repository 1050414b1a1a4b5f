"""Evaluation tasks: where calibration data comes from and how a model is scored.

- ``FashionMNIST``: zoo classifiers. Calibration = seeded subset of the *train* split; score =
  top-1 on the full 10k *test* split (and top-1 agreement with the float model).
- ``TextEmbedding``: MiniLM. Calibration = sentences from the shipped text's calib pool;
  evaluation on the disjoint eval pool, each sentence with its near-duplicate (every fourth
  word dropped, ``data.text.eval_pairs``). Score = ``top1``, near-duplicate retrieval accuracy
  (a row's prediction is its most similar other row; right when that is its partner), plus the
  cosine similarity of embeddings to the float model and the top-1 retrieval agreement with it.
- ``ImageNetPhotos``: ImageNet CNNs (EfficientNet-Lite2). No labels exist offline, so the score
  is fidelity to the float model on seeded random crops of real photos (``data.photos``):
  top-1 agreement (%) and mean KL(float || quantized) of the 1000-class softmax. Calibration
  crops come from photos disjoint from the evaluation photos.
- ``CausalLM``: language models (SmolLM2). Calibration = segments of ``seq_len`` tokens at
  seeded random offsets of the calibration novels; evaluation = the first ``n_eval``
  consecutive windows of another novel (``data.text.lm_text``), the same for every method.
  Score = perplexity exp(mean next-token NLL); against float also the per-window paired NLL
  difference (mean and standard error) and the next-token top-1 agreement.
- ``DiffusionTask`` (``diffusion.task``): samples from fixed noise, FD/KID on resnet20 features.

A task may also have ``keep(out_dir, fp_outputs, q_outputs) -> [file names]``: ``slimtorch
quantize --out DIR`` calls it after saving, for files the report shows (diffusion: sample grid).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimtorchError
from ..diffusion.task import DiffusionTask
from ..graph.capture import call_model


@dataclass
class FashionMNIST:
    data_dir: str | None = None
    batch_size: int = 500
    kind: str = "classification"

    @classmethod
    def for_entry(cls, entry, data_dir: str | None = None) -> "FashionMNIST":
        """The task of zoo entry ``entry`` (a ``zoo.registry.ZooEntry``)."""
        return cls(data_dir)

    def calibration(self, n: int, seed: int, batch_size: int) -> list[torch.Tensor]:
        from ..data.fashion_mnist import calibration_set
        return list(calibration_set(n, seed, self.data_dir).split(batch_size))

    def training(self, n: int | None, seed: int) -> list[torch.Tensor]:
        """Train-split images for methods that train (all if ``n`` is None, else a seeded
        subset of ``n``), in batches of 500 (the method re-batches them)."""
        from ..data.fashion_mnist import train_set
        return list(train_set(n, seed, self.data_dir).split(self.batch_size))

    def inputs(self, n: int | None = None) -> list[torch.Tensor]:
        """The first ``n`` test images (all if None) in batches."""
        from ..data.fashion_mnist import test_set
        return list(test_set(self.data_dir)[0][:n].split(self.batch_size))

    def test_images(self) -> torch.Tensor:
        """All test images ``[N, 1, 28, 28]`` (deployment checks slice them)."""
        from ..data.fashion_mnist import test_set
        return test_set(self.data_dir)[0]

    def outputs(self, model: nn.Module, progress: bool = False) -> torch.Tensor:
        return run_batches(model, self.inputs(), progress, "eval")

    def score(self, logits: torch.Tensor, fp_logits: torch.Tensor | None = None) -> dict:
        from ..data.fashion_mnist import test_set
        labels = test_set(self.data_dir)[1]
        out = {"top1": round(100.0 * (logits.argmax(1) == labels).float().mean().item(), 2)}
        if fp_logits is not None:
            agree = (logits.argmax(1) == fp_logits.argmax(1)).float().mean().item()
            out["top1_agreement"] = round(100.0 * agree, 2)
        return out


@dataclass
class TextEmbedding:
    n_eval: int = 1000
    batch_size: int = 64
    kind: str = "embedding"

    def _tok(self):
        if not hasattr(self, "_tokenizer"):
            from ..zoo.minilm import load_tokenizer
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    def calibration(self, n: int, seed: int, batch_size: int) -> list[dict]:
        from ..data.text import load_sentences, text_batches
        pool = load_sentences("calib")
        n = min(n, len(pool))
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
        return text_batches(self._tok(), [pool[i] for i in idx.tolist()], batch_size)

    def inputs(self, n: int | None = None) -> list[dict]:
        """Token batches of the first ``n`` eval sentences (``n_eval`` if None) followed by their
        near-duplicates (``data.text.eval_pairs``)."""
        from ..data.text import eval_pairs, text_batches
        return text_batches(self._tok(), eval_pairs(n or self.n_eval), self.batch_size)

    def outputs(self, model: nn.Module, progress: bool = False) -> torch.Tensor:
        from ..zoo.minilm import embed
        batches = self.inputs()
        with torch.inference_mode():
            return embed(model, tqdm(batches, desc="eval", disable=not progress, leave=False))

    def score(self, emb: torch.Tensor, fp_emb: torch.Tensor | None = None) -> dict:
        from .fidelity import cosine_fidelity, pair_top1, retrieval_agreement
        out = {"top1": round(100.0 * pair_top1(emb), 2)}
        if fp_emb is None:
            return {**out, "cosine": 1.0, "retrieval_agreement": 100.0}
        return {**out, "cosine": round(cosine_fidelity(fp_emb, emb), 5),
                "retrieval_agreement": round(100.0 * retrieval_agreement(fp_emb, emb), 2)}


@dataclass
class ImageNetPhotos:
    size: int = 260
    mean: float = 127.0
    std: float = 128.0
    n_eval: int = 500
    eval_seed: int = 0
    batch_size: int = 50
    kind: str = "imagenet_photos"

    @classmethod
    def for_entry(cls, entry, data_dir: str | None = None) -> "ImageNetPhotos":
        """The task of zoo entry ``entry``: crops at its input resolution."""
        return cls(size=entry.input_shape[-1])

    def calibration(self, n: int, seed: int, batch_size: int) -> list[torch.Tensor]:
        from ..data.photos import normalize, random_crops
        crops = random_crops("calib", n, seed, self.size)
        return list(normalize(crops, self.mean, self.std).split(batch_size))

    def test_images(self) -> torch.Tensor:
        """The ``n_eval`` evaluation crops, normalised, ``[N, 3, size, size]`` (built once)."""
        if not hasattr(self, "_eval"):
            from ..data.photos import normalize, random_crops
            crops = random_crops("eval", self.n_eval, self.eval_seed, self.size)
            self._eval = normalize(crops, self.mean, self.std)
        return self._eval

    def inputs(self, n: int | None = None) -> list[torch.Tensor]:
        """The first ``n`` evaluation crops (all if None) in batches."""
        return list(self.test_images()[:n].split(self.batch_size))

    def outputs(self, model: nn.Module, progress: bool = False) -> torch.Tensor:
        return run_batches(model, self.inputs(), progress, "eval")

    def score(self, logits: torch.Tensor, fp_logits: torch.Tensor | None = None) -> dict:
        from .fidelity import logits_agreement
        if fp_logits is None:
            return {"top1_agreement": 100.0, "kl": 0.0}
        m = logits_agreement(fp_logits, logits)
        return {"top1_agreement": round(100.0 * m["top1_agreement"], 2),
                "kl": round(m["kl"], 5)}


@dataclass
class CausalLM:
    tokenizer: Any = None         # () -> tokenizer of the model
    seq_len: int = 512
    n_eval: int = 32              # ~16k evaluation tokens: about a minute for 135M params
    batch_size: int = 2           # windows per forward; logits are 512 x vocab floats each
    max_calib_batch: int = 8      # cap on segments per calibration forward, for the same reason
    calib_size: int = 128         # default number of calibration segments
    kind: str = "causal_lm"

    @classmethod
    def for_entry(cls, entry, data_dir: str | None = None) -> "CausalLM":
        return cls(tokenizer=entry.tokenizer, seq_len=entry.input_shape[-1])

    def tokens(self, split: str) -> torch.Tensor:
        """The whole text of ``split`` as one 1-D token tensor (tokenised once)."""
        cache = self.__dict__.setdefault("_tokens", {})
        if split not in cache:
            from ..data.text import lm_text
            ids = self.tokenizer()(lm_text(split), return_tensors="pt").input_ids
            cache[split] = ids[0]  # [N]
        return cache[split]

    def _batches(self, segments: torch.Tensor, size: int) -> list[dict]:
        return [{"input_ids": x} for x in segments.split(size)]

    def calibration(self, n: int, seed: int, batch_size: int) -> list[dict]:
        from ..data.text import token_segments
        segs = token_segments(self.tokens("calib"), self.seq_len, n, seed)
        return self._batches(segs, min(batch_size, self.max_calib_batch))

    def inputs(self, n: int | None = None) -> list[dict]:
        from ..data.text import token_segments
        segs = token_segments(self.tokens("eval"), self.seq_len, n or self.n_eval, None)
        return self._batches(segs, self.batch_size)

    @torch.inference_mode()
    def outputs(self, model: nn.Module, progress: bool = False) -> dict[str, torch.Tensor]:
        """Per-token next-token NLL and argmax prediction, ``[W, T-1]`` each. A model with
        token pruning (Agile-Quant) also gives ``kept`` (the positions whose prediction
        survived every pruning layer) and the same model's NLL with pruning off
        (``nll_unpruned``), so its perplexity is scored on the surviving tokens only and
        paired with the unpruned model on those same tokens."""
        from ..algorithms.agile_prune import pruner_of
        pruner = pruner_of(model)
        out: dict[str, list] = {"nll": [], "pred": []}
        for b in tqdm(self.inputs(), desc="eval", disable=not progress, leave=False):
            self._one(model, b, out, "")
            if pruner is not None:
                out.setdefault("kept", []).append(pruner.kept[:, :-1])  # i predicts i + 1
                with pruner.disabled():
                    self._one(model, b, out, "_unpruned")
        return {k: torch.cat(v) for k, v in out.items()}

    @staticmethod
    def _one(model: nn.Module, b: dict, out: dict, suffix: str) -> None:
        logits = _next_token_logits(call_model(model, b), b["input_ids"])[:, :-1]
        target = b["input_ids"][:, 1:]
        out.setdefault("nll" + suffix, []).append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2).float(), target, reduction="none"))
        out.setdefault("pred" + suffix, []).append(logits.argmax(-1))

    def score(self, out: dict, fp_out: dict | None = None) -> dict:
        if "kept" in out:
            return _score_surviving(out, fp_out)
        res = {"ppl": round(out["nll"].mean().exp().item(), 4)}
        if fp_out is None:
            return res
        diff = out["nll"].mean(1) - fp_out["nll"].mean(1)  # [W] paired per window
        fp_ppl = fp_out["nll"].mean().exp().item()
        res.update({"ppl_delta_pct": round(100.0 * (res["ppl"] / fp_ppl - 1.0), 3),
                    "nll_diff": round(diff.mean().item(), 5),
                    "nll_diff_se": round((diff.std() / diff.numel() ** 0.5).item(), 5),
                    "token_agreement": round(
                        100.0 * (out["pred"] == fp_out["pred"]).float().mean().item(), 2)})
        return res


def _paired(nll: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over windows of each window's mean NLL difference on the
    ``keep`` positions ([W, T-1] each)."""
    n = keep.sum(1).clamp(min=1)
    diff = ((nll - ref) * keep).sum(1) / n  # [W]
    return round(diff.mean().item(), 5), round((diff.std() / diff.numel() ** 0.5).item(), 5)


def _score_surviving(out: dict, fp_out: dict | None) -> dict:
    """Scores of a token-pruned model: perplexity on the surviving positions only (a pruned
    token's prediction is not made), against the float model and the same model unpruned on
    exactly those positions; the unpruned model on every position too."""
    keep = out["kept"]

    def ppl(nll):
        return round(nll[keep].mean().exp().item(), 4)
    res = {"ppl": ppl(out["nll"]), "kept_pct": round(100.0 * keep.float().mean().item(), 2),
           "unpruned_ppl_same_tokens": ppl(out["nll_unpruned"]),
           "unpruned_ppl": round(out["nll_unpruned"].mean().exp().item(), 4)}
    res["prune_nll_diff"], res["prune_nll_diff_se"] = _paired(out["nll"], out["nll_unpruned"],
                                                              keep)
    if fp_out is None:
        return res
    fp_same = ppl(fp_out["nll"])
    res.update({"fp_ppl_same_tokens": fp_same,
                "ppl_delta_pct": round(100.0 * (res["ppl"] / fp_same - 1.0), 3),
                "token_agreement": round(
                    100.0 * (out["pred"] == fp_out["pred"])[keep].float().mean().item(), 2)})
    res["nll_diff"], res["nll_diff_se"] = _paired(out["nll"], fp_out["nll"], keep)
    fp_all = fp_out["nll"].mean().exp().item()
    res["unpruned_ppl_delta_pct"] = round(100.0 * (res["unpruned_ppl"] / fp_all - 1.0), 3)
    return res


TASKS = {"fashion_mnist": FashionMNIST, "imagenet_photos": ImageNetPhotos,
         "causal_lm": CausalLM, "diffusion": DiffusionTask}


def _next_token_logits(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """``[b, T, V]`` next-token logits of a causal LM's output, or an error naming the fix."""
    logits = getattr(out, "logits", out)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3
            and logits.shape[:2] == ids.shape):
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else \
            f"a tensor of shape {tuple(out.shape)}"
        raise SlimtorchError(
            f"the model returned {got}, not next-token logits [batch, tokens, vocabulary]: "
            "perplexity needs a causal LM with its LM head (e.g. LlamaForCausalLM, not "
            "LlamaModel)")
    return logits


def task_for(source: str, data_dir: str | None = None):
    if source in ("minilm", "hf:minilm", "zoo:minilm"):
        return TextEmbedding()
    if source.startswith("zoo:"):
        from ..zoo.registry import get_entry
        entry = get_entry(source.partition(":")[2])
        return TASKS[entry.task].for_entry(entry, data_dir)
    raise SlimtorchError(f"no evaluation task for {source!r}: the CLI evaluates zoo:NAME models "
                     "(Fashion-MNIST) and minilm (text embeddings); use the Python API for "
                     "other models")


@torch.inference_mode()
def run_batches(model: nn.Module, batches: list[Any], progress: bool = False,
                desc: str = "run") -> torch.Tensor:
    outs = [call_model(model, b) for b in tqdm(batches, desc=desc, disable=not progress,
                                                leave=False)]
    return torch.cat(outs)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
