"""Round-to-nearest: the calibrated ranges are final; nothing is optimised."""
from __future__ import annotations

from typing import Any

from ..methods import MethodConfig, MethodContext, register_method


class RTNConfig(MethodConfig):
    """No settings."""


@register_method("rtn", RTNConfig)
def apply(model, cfg: RTNConfig, ctx: MethodContext) -> dict[str, Any]:
    return {}
