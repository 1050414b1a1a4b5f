"""What machine and software a benchmark ran on (printed above every table).

The CPU line names the instruction sets the int8 kernels choose between, because they decide
which kernel class ran: onnxruntime's MLAS multiplies uint8 × int8 with VPMADDUBSW on x86 CPUs
without VNNI (pairs of products summed in saturating int16), with VPDPBUSD(S) on CPUs with
AVX-VNNI or AVX512-VNNI, and with AMX tiles where AMX-INT8 is present
(``onnxruntime/core/mlas/lib/platform.cpp``). ``u8s8_saturates`` is that rule.
"""
from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from importlib import metadata
from typing import Iterator

import torch

# /proc/cpuinfo flags that select an int8 kernel class, in the order they are printed
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: leave them); the caller's
    setting is restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags of /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def has_vnni(flags: frozenset[str]) -> bool:
    """Whether MLAS picks a non-saturating u8×s8 kernel: AVX-VNNI, AVX512-VNNI (with the
    AVX512 BW/DQ/VL core it requires) or AMX-INT8."""
    avx512_core = {"avx512bw", "avx512dq", "avx512vl"} <= flags
    return "avx_vnni" in flags or "amx_int8" in flags or (avx512_core and "avx512_vnni" in flags)


def u8s8_saturates() -> bool:
    """Whether onnxruntime's u8×s8 int8 kernels can saturate on this CPU."""
    return saturates_on(cpu_flags(), platform.machine())


def saturates_on(flags: frozenset[str] | None, arch: str) -> bool:
    """An x86 CPU without VNNI saturates; unknown flags on x86 count as saturating (the exact
    weight form is then chosen); ARM kernels accumulate in int32 (onnxruntime quantization
    docs)."""
    if arch.lower() not in X86:
        return False
    return flags is None or not has_vnni(flags)


def cpu_isa() -> str:
    """E.g. ``AVX2 (avx2; no avx512f avx512bw avx512_vnni avx_vnni amx_int8)``."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if flags is None:
        return f"{cap} (CPU flags unknown)"
    have = [f for f in ISA_FLAGS if f in flags]
    lack = [f for f in ISA_FLAGS if f not in flags]
    return f"{cap} ({' '.join(have) or 'none of ' + ' '.join(ISA_FLAGS)}" + (
        f"; no {' '.join(lack)})" if have and lack else ")")


def int8_kernel_class() -> str:
    """Which u8×s8 dot product onnxruntime's int8 kernels use on this CPU."""
    if platform.machine().lower() not in X86:
        return f"{platform.machine()} (int32 accumulation)"
    return ("VPMADDUBSW (int16 pair sums, saturating)" if u8s8_saturates() else
            "VNNI/AMX (int32 accumulation)")


def machine_info() -> dict[str, str]:
    info = {"cpu": cpu_name(), "isa": cpu_isa(), "onnxruntime u8×s8 dot": int8_kernel_class(),
            "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other work on the machine inflates timings: say so
        info["load avg (1 min) at start"] = f"{os.getloadavg()[0]:.1f}"
    for pkg in ("torch", "slimtorch", "onnxruntime", "openvino", "transformers"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return info


def machine_markdown() -> str:
    return "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items())
