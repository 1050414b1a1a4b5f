"""What machine and software a benchmark ran on (printed above every table)."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, str]:
    info = {"cpu": cpu_name(), "cores": str(os.cpu_count()),
            "torch threads": str(torch.get_num_threads()), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other work on the machine inflates timings: say so
        info["load avg (1 min) at start"] = f"{os.getloadavg()[0]:.1f}"
    for pkg in ("torch", "slimtorch", "onnxruntime", "transformers"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return info


def machine_markdown() -> str:
    return "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items())
