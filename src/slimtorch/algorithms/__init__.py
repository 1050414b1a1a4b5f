"""Quantization methods. Each is one module with an ``apply`` entry point:

    apply(model, recipe, batches, *, seed, progress) -> dict   # per-method statistics

It runs after quantizers are attached and calibrated, before weights are frozen. ``ALGORITHMS``
maps a recipe's ``method`` to it.
"""
from . import rtn

ALGORITHMS = {"rtn": rtn.apply}
