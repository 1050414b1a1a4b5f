"""The slimtorch artifact: ``model.safetensors`` + ``slimtorch.json``; no pickle.

- Integer weight codes are stored bit-packed (b bits per weight, offset to be non-negative),
  next to their scales and zero-points and every other tensor of the model, in the compact
  layout of ``compact`` (all-zero tensors as shapes, shared tensors once, small tensors
  concatenated per dtype).
- A sparse (masked) layer stores its mask as a bitmask (1 bit per weight) and only the kept
  weights: their packed codes, or for a float layer their values (``sparse`` in the config);
  a pruned weight costs one bit.
- ``slimtorch.json`` holds the recipe, the plan (which quantizer sits where), the graph
  description, the model's source (``zoo:resnet20``, ``torchvision:resnet18``...), versions and
  the SHA-256 of the tensor file, so a truncated or edited artifact is refused on load.
- Everything is written into a temporary directory and renamed into place.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import versions
from ..errors import ArtifactError
from ..graph.rewrite import apply_fold_structure, decompose_attention, untie_parameters
from ..graph.split_concat import split_concat
from ..quant.prepare import META_ATTR, attach, quant_layers
from ..quant.quantizer import Mode
from .compact import compact, expand

FORMAT = "slimtorch-artifact"
FORMAT_VERSION = 1
TENSORS, CONFIG = "model.safetensors", "slimtorch.json"


def pack_bits(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer codes in [qmin, qmin + 2^bits) into a uint8 tensor of ⌈numel·bits/8⌉."""
    u = (q.reshape(-1).to(torch.int32) - qmin).numpy().astype(np.uint8)
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [N, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, qmin: int, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    planes = np.unpackbits(packed.numpy(), count=n * bits).reshape(n, bits)
    u = (planes.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1)
    return torch.from_numpy(u + qmin).to(torch.int16).reshape(shape)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Tensors to write for a quantized model (frozen weights as packed integer codes, in the
    compact layout of ``compact``) and the config entries that describe them."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    packed: dict[str, dict] = {}
    sparse: dict[str, dict] = {}
    written: list[torch.Tensor] = []
    for fqn, m in quant_layers(model):
        mask = m.weight_mask
        if mask is not None:
            sparse[fqn] = {"shape": list(mask.shape), "kept": int(mask.sum())}
            state[f"{fqn}.weight_mask.bits"] = torch.from_numpy(
                np.packbits(mask.reshape(-1).numpy()))
            if not m.frozen:  # a float sparse layer: the kept values only
                state[f"{fqn}.weight.kept"] = state.pop(f"{fqn}.weight")[mask].contiguous()
        if not m.frozen:
            continue
        wq = m.weight_quantizer
        state.pop(f"{fqn}.weight")
        kept = m.weight_int if mask is None else m.weight_int[mask]
        codes = pack_bits(kept, wq.spec.bits, wq.qmin)
        # equal codes (a tied embedding and LM head on one grid) share one tensor, which
        # ``compact`` then writes once
        codes = next((c for c in written if c.shape == codes.shape and c.dtype == codes.dtype
                      and torch.equal(c, codes)), codes)
        written.append(codes)
        state[f"{fqn}.weight_int.packed"] = codes
        packed[fqn] = {"bits": wq.spec.bits, "qmin": wq.qmin, "shape": list(m.weight_int.shape)}
    tensors, layout = compact(state)
    return tensors, {"packed": packed, "sparse": sparse, "layout": layout}


def save(model: nn.Module, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write the artifact for a model returned by ``slimtorch.quantize`` into ``directory``."""
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise ArtifactError("this model was not produced by slimtorch.quantize; nothing to save")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state, layout = artifact_tensors(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(tmp / TENSORS))
        config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "source": getattr(model, "slimtorch_source", None), "meta": meta,
                  **layout, "sha256": _sha256(tmp / TENSORS),
                  "versions": versions(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_dir(tmp: Path, directory: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[str]:
    """A temporary file name beside ``path``: the block writes it, and it is renamed onto
    ``path`` when the block succeeds (with permissions ``mode`` if given; mkstemp makes 0600)
    and removed when it raises, so ``path`` is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    cfg_path = directory / CONFIG
    if not cfg_path.is_file() or not (directory / TENSORS).is_file():
        raise ArtifactError(f"{directory} is not a slimtorch artifact: expected {CONFIG} and "
                            f"{TENSORS} (write one with `slimtorch quantize --out DIR`)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_path} is corrupt (not valid JSON: {e}); re-create the "
                            "artifact") from None
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{cfg_path} is not a version-{FORMAT_VERSION} slimtorch artifact")
    return cfg


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from an artifact. ``model``: the float architecture, needed
    when the artifact's source is not a model slimtorch can build itself."""
    directory = Path(directory)
    cfg = read_config(directory)
    if _sha256(directory / TENSORS) != cfg.get("sha256"):
        raise ArtifactError(f"{directory / TENSORS} does not match the checksum in {CONFIG}: "
                            "the artifact is truncated or was modified; re-create it")
    state = expand(load_file(str(directory / TENSORS)), cfg.get("layout"))
    if model is None:
        if not cfg.get("source"):
            raise ArtifactError("this artifact was made from a custom model: pass the float "
                                "architecture, e.g. slimtorch.load(dir, model=MyNet())")
        from ..zoo.sources import load_model
        model = load_model(cfg["source"], pretrained=False)
    else:
        model = copy.deepcopy(model)
    model.eval()
    meta = cfg["meta"]
    if meta.get("pruning"):  # structured pruning: shrink the base model as it was shrunk
        from ..prune.surgery import replay
        replay(model, meta["pruning"])
    if meta["decomposed"]:
        decompose_attention(model)
    apply_fold_structure(model, [tuple(p) for p in meta["bn_folds"]])
    split_concat(model, meta.get("split_concat", []))
    untie_parameters(model, meta.get("untied", []))
    attach(model, meta["plan"], seed=meta["seed"])
    _load_state(model, state, cfg["packed"], cfg.get("sparse", {}))
    setattr(model, META_ATTR, meta)
    if meta.get("token_pruning"):  # Agile-Quant's token pruning: hooks, no tensors
        from ..algorithms.agile_prune import install_pruning
        install_pruning(model, meta["token_pruning"])
    model.slimtorch_source = cfg.get("source")
    return model


def _unpack_mask(state: dict, fqn: str, info: dict) -> torch.Tensor:
    n = int(np.prod(info["shape"]))
    bits = np.unpackbits(state.pop(f"{fqn}.weight_mask.bits").numpy(), count=n)
    mask = torch.from_numpy(bits.astype(bool)).reshape(info["shape"])
    if int(mask.sum()) != info["kept"]:
        raise ArtifactError(f"the mask of {fqn} keeps {int(mask.sum())} weights, the config "
                            f"says {info['kept']}: the artifact is corrupt; re-create it")
    return mask


def _load_state(model: nn.Module, state: dict, packed: dict, sparse: dict) -> None:
    masks = {fqn: _unpack_mask(state, fqn, info) for fqn, info in sparse.items()}
    ints = {}
    for fqn, info in packed.items():
        shape = info["shape"]
        if fqn in masks:  # the kept codes only; pruned ones are set to the grid's zero
            kept = unpack_bits(state.pop(f"{fqn}.weight_int.packed"), info["bits"],
                               info["qmin"], [int(masks[fqn].sum())])
            full = torch.zeros(shape, dtype=kept.dtype)
            full[masks[fqn]] = kept
            ints[fqn] = full
        else:
            ints[fqn] = unpack_bits(state.pop(f"{fqn}.weight_int.packed"), **info)
    for fqn, mask in masks.items():
        if fqn not in packed:  # a float sparse layer: scatter the kept values
            kept = state.pop(f"{fqn}.weight.kept")
            w = torch.zeros(mask.shape, dtype=kept.dtype)
            w[mask] = kept
            state[f"{fqn}.weight"] = w
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - {f"{fqn}.weight" for fqn in packed}
    if missing or result.unexpected_keys:
        raise ArtifactError(f"artifact tensors do not fit the model: missing {sorted(missing)[:5]}"
                            f", unexpected {sorted(result.unexpected_keys)[:5]}")
    for fqn, m in quant_layers(model):
        if m.weight_quantizer is not None:
            m.weight_quantizer.mode = Mode.QUANT
        if m.input_quantizer is not None:
            m.input_quantizer.mode = Mode.QUANT
        if fqn in masks:
            m.set_weight_mask(masks[fqn])
        if fqn in ints:
            m.set_weight_int(ints[fqn])
    sites = getattr(model, "slimtorch_functional", None)
    if sites is not None:
        for qs in sites.sites.values():
            for q in qs:
                q.mode = Mode.QUANT
