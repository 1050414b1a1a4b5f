"""``integer_only`` (build and calibrate an integer-only model) and its files: the integer
constants in ``integer_only.safetensors`` and everything else — scales, ranges, exponential
bases, the model's source and input shape — in ``integer_only.json``, with the tensors'
sha256. Loading re-exports the model (the graph is the model's code, never pickled) and
restores the constants, so the reloaded integer forward is bit-exact."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ArtifactError, IntegerOnlyError
from ..export.artifact import atomic_path
from .integer_ops import Q
from .integer_only import IntegerOnlyModel
from .ivit import ExpBase

TENSORS, CONFIG, FORMAT = "integer_only.safetensors", "integer_only.json", "slimtorch-integer-only"


def integer_only(model: nn.Module, calib: Iterable[Tensor] | Tensor, *, exp: str = "shift"
                 ) -> IntegerOnlyModel:
    """The integer-only form of ``model`` (I-ViT), calibrated on ``calib`` (a Tensor or batches
    of Tensors): ``forward`` runs integer kernels between its input quantizer and output
    dequantizer; ``fake`` the same quantization points in float."""
    batches = list(calib.split(128)) if isinstance(calib, Tensor) else list(calib)
    if not batches or not all(isinstance(b, Tensor) for b in batches):
        raise IntegerOnlyError("integer-only lowering takes models with one Tensor input: give "
                               "calibration data as a Tensor or a list of Tensors")
    return IntegerOnlyModel(model, batches[0][:2], exp=exp).calibrate(batches)


def save_integer_only(io: IntegerOnlyModel, directory: str | Path, *, source: str | None = None,
                      extra: dict | None = None) -> Path:
    """Write ``io``'s files into ``directory`` (each file written whole or not at all)."""
    if not io.frozen:
        raise IntegerOnlyError("uncalibrated: call calibrate(batches) before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    consts = {k: _encode(v, k, tensors) for k, v in io.consts.items()}
    with atomic_path(directory / TENSORS) as tmp:
        save_file(tensors, tmp)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
    config = {"format": FORMAT, "source": source, "exp": io.exp, "input_scale": io.input_scale,
              "example_shape": list(io.example_shape), "absmax": io.absmax, "consts": consts,
              "sha256": digest, **(extra or {})}
    with atomic_path(directory / CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=1))
    return directory


def load_integer_only(directory: str | Path, model: nn.Module | None = None) -> IntegerOnlyModel:
    """The integer-only model saved in ``directory``; ``model``: the float model it was built
    from (default: loaded from the recorded source, e.g. ``zoo:vit``)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
        raw = (directory / TENSORS).read_bytes()
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory}: no readable integer-only files ({e}); write them "
                            "with `slimtorch lower DIR --integer-only`") from None
    if config.get("format") != FORMAT or hashlib.sha256(raw).hexdigest() != config["sha256"]:
        raise ArtifactError(f"{directory / TENSORS}: checksum or format mismatch (modified or "
                            "truncated); re-run `slimtorch lower DIR --integer-only`")
    if model is None:
        if not config.get("source"):
            raise ArtifactError("the files record no model source: pass model=")
        from ..zoo.sources import load_model
        model = load_model(config["source"])
    io = IntegerOnlyModel(model, torch.zeros(config["example_shape"]), exp=config["exp"])
    tensors = load_file(str(directory / TENSORS))
    io.absmax, io.input_scale = config["absmax"], config["input_scale"]
    io.consts = {k: _decode(v, tensors) for k, v in config["consts"].items()}
    io.frozen = True
    return io


def _encode(v: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(v, Tensor):
        tensors[key] = v.contiguous()
        return {"tensor": key}
    if isinstance(v, Q):
        return {"q": _encode(v.codes, key + "/codes", tensors), "scale": v.scale}
    if isinstance(v, ExpBase):
        return {"exp": dataclasses.asdict(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode(x, f"{key}/{i}", tensors) for i, x in enumerate(v)]}
    if isinstance(v, (int, float)):
        return v
    raise TypeError(f"cannot save an integer constant of type {type(v).__name__}")


def _decode(v: Any, tensors: dict[str, Tensor]) -> Any:
    if not isinstance(v, dict):
        return v
    if "tensor" in v:
        return tensors[v["tensor"]]
    if "q" in v:
        return Q(_decode(v["q"], tensors), v["scale"])
    if "exp" in v:
        return ExpBase(**v["exp"])
    return tuple(_decode(x, tensors) for x in v["tuple"])
