"""The CPU runtimes an exported ONNX file is checked and timed in, behind one interface.

A ``Runtime`` gives, for an ONNX file and a thread count, a session (feeds → first output, as
numpy) and a census of which compute layers run as integer kernels there:

- ``onnxruntime`` (CPUExecutionProvider, all graph optimisations): ``onnx_check`` — the op
  types of its optimised graph, and the quantized ops left in float with the reason;
- ``openvino`` (CPU plugin, f32 inference precision): ``onnx_openvino`` — the compiled
  model's runtime graph, int8 vs float layers.

The export check (``export_onnx(runtimes=...)``), the speed bench (``measure_speed``) and the
CLI (``--runtime onnxruntime,openvino``) all take runtimes by name through ``get_runtime``; a
runtime whose package is missing raises ``RuntimeMissingError`` naming the install.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SlimtorchError

DEFAULT_RUNTIMES = ("onnxruntime",)


class RuntimeMissingError(SlimtorchError, ImportError):
    """A runtime was asked for whose Python package is not installed."""


@dataclass(frozen=True)
class Runtime:
    name: str
    package: str  # the module it imports
    install: str  # the command that installs it
    session: Callable[[str | Path, int], Callable[[dict], np.ndarray]]
    census: Callable[[str | Path, int], dict]


def _ort_session(path: str | Path, threads: int) -> Callable[[dict], np.ndarray]:
    from . import onnx_check
    sess = onnx_check.make_session(path, threads)
    return lambda feeds: sess.run(None, feeds)[0]


def _ort_census(path: str | Path, threads: int) -> dict:
    from . import onnx_check
    return onnx_check.kernel_census(path, threads)


def _ov_session(path: str | Path, threads: int) -> Callable[[dict], np.ndarray]:
    from . import onnx_openvino
    return onnx_openvino.session(path, threads)


def _ov_census(path: str | Path, threads: int) -> dict:
    from . import onnx_openvino
    return onnx_openvino.census(path, threads)


RUNTIMES = {
    "onnxruntime": Runtime("onnxruntime", "onnxruntime",
                           "pip install onnxruntime (or pip install 'slimtorch[export]')",
                           _ort_session, _ort_census),
    "openvino": Runtime("openvino", "openvino",
                        "pip install openvino==2026.4.1 (or pip install 'slimtorch[deploy]')",
                        _ov_session, _ov_census),
}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``, its package importable; else a SlimtorchError that says
    what to write or install."""
    rt = RUNTIMES.get(name)
    if rt is None:
        raise SlimtorchError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    if importlib.util.find_spec(rt.package) is None:
        raise RuntimeMissingError(f"runtime {name!r} is not installed: {rt.install}")
    return rt


def parse_runtimes(*specs: str | tuple | list) -> tuple[str, ...]:
    """Names from comma-separated strings or sequences of them (``"onnxruntime,openvino"``,
    ``("onnxruntime", "openvino")``) → validated, de-duplicated, in order."""
    parts = [p for s in specs for p in ([s] if isinstance(s, str) else s)]
    names = tuple(dict.fromkeys(n.strip() for p in parts for n in p.split(",") if n.strip()))
    if not names:
        raise SlimtorchError(f"no runtime given: use one or more of {', '.join(RUNTIMES)}, "
                             "comma-separated")
    for n in names:
        get_runtime(n)
    return names
