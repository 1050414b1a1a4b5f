"""Base of every method's config, validated from a recipe's ``method_args``."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import RecipeError


class MethodConfig(BaseModel):
    """Unknown keys and bad values are errors naming ``method_args.KEY`` and the allowed keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, args: dict[str, Any], method: str) -> "MethodConfig":
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            msgs = [f"method_args.{'.'.join(map(str, x['loc']))}: "
                    f"{x['msg'].removeprefix('Value error, ')}" for x in e.errors()]
            raise RecipeError(f"invalid method_args for {method!r}: " + "; ".join(msgs)
                              + f" (allowed keys: {', '.join(cls.model_fields)})") from None
