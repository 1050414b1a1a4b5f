"""Round-to-nearest: the calibrated ranges are final; nothing is optimised."""
from __future__ import annotations

from typing import Any


def apply(model, recipe, batches, *, seed: int = 0, progress: bool = False,
          float_model=None, work_dir=None) -> dict[str, Any]:
    if recipe.method_args:
        from ..errors import RecipeError
        raise RecipeError(f"method 'rtn' takes no method_args, got {sorted(recipe.method_args)}")
    return {}
