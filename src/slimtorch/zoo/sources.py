"""Build a model from a source string: ``zoo:NAME``, ``minilm``, ``torchvision:NAME``,
``timm:NAME``. The source is remembered on the module (``slimtorch_source``) so that an
artifact can rebuild the architecture on load.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnknownModelError

SCHEMES = ("zoo:NAME", "minilm", "torchvision:NAME", "timm:NAME")


def load_model(source: str, *, pretrained: bool = True) -> nn.Module:
    scheme, _, name = source.partition(":")
    if source in ("minilm", "hf:minilm", "zoo:minilm"):
        from .minilm import load_minilm
        model = load_minilm()[0]
        source = "minilm"
    elif scheme == "zoo":
        from .registry import load_zoo_model
        model = load_zoo_model(name, pretrained=pretrained)
    elif scheme == "torchvision":
        import torchvision
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise UnknownModelError(f"unknown torchvision model {name!r}") from None
    elif scheme == "timm":
        import timm
        if not timm.is_model(name):
            raise UnknownModelError(f"unknown timm model {name!r}")
        model = timm.create_model(name, pretrained=False)
    else:
        raise UnknownModelError(f"unknown model {source!r}: use one of {', '.join(SCHEMES)} "
                                "(`slimtorch zoo list` shows the bundled models)")
    model.eval()
    model.slimtorch_source = source
    return model
