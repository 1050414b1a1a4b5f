"""slimtorch: post-training compression of PyTorch models, measured.

    import slimtorch
    qmodel = slimtorch.quantize(model, "w4a4", calib_data, seed=0)
    smodel = slimtorch.sparsify(model, "2:4-sparsegpt", calib_data)  # N:M / unstructured
    pmodel = slimtorch.prune(model, "macs-0.5-taylor", calib_data)  # physically smaller
    slimtorch.save(qmodel, "out/")
    qmodel = slimtorch.load("out/")
    report = slimtorch.export_onnx(qmodel, "model.onnx", example_inputs)
    fast = slimtorch.lower(qmodel)  # in place: int8 / packed low-bit kernels in PyTorch
    io = slimtorch.integer_only(vit, calib_data)  # I-ViT: integer kernels from input to output
    print(slimtorch.inspect(qmodel, model, calib_batch).table())  # worst layers by SQNR
    slimtorch.report(["out/"], "report.html")  # HTML page + report.md: metrics, SQNR, bits
    sens = slimtorch.sensitivity(model, calib_data, held_data, bits=(2, 4, 8))  # per layer
    mixed = slimtorch.allocate(sens, avg_bits=4, recipe="w4a8")  # a Recipe with overrides
    res = slimtorch.sweep("sweep.yaml", "runs/grid")  # models × recipes × seeds on Ray

The names below are imported on first use (PEP 562), so ``import slimtorch.errors`` or
``slimtorch.methods`` does not import torch or the whole package.
"""
from __future__ import annotations

import importlib

from ._version import __version__

_PUBLIC = {"quantize": "api", "prune": "api", "sparsify": "api", "save": "api", "load": "api",
           "export_onnx": "api", "inspect": "api", "report": "eval.report", "lower": "intops.lower",
           "integer_only": "intops.integer_artifact", "Recipe": "recipe",
           "resolve_recipe": "recipe", "SlimtorchError": "errors",
           "sensitivity": "api", "allocate": "api", "sweep": "sweeps"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimtorch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
