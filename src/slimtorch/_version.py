"""The package version and the versions an artifact or a metrics file records (a leaf module:
anything may import it; it imports no part of slimtorch, and torch only when asked)."""
from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    import torch
    return {"slimtorch": __version__, "torch": torch.__version__,
            "python": platform.python_version()}
