"""Structured pruning: dependency groups from the captured graph (``groups``), physically
smaller modules and a replayable history (``surgery``), criteria (``criteria``: magnitude,
Taylor, random, HESSO's saliency), selection to a MACs/params target (``select``), the
``prune``, ``hesso``, ``lowrank`` and ``recover`` methods on the registry (``method``,
``hesso``, ``lowrank``, ``recover``).

``slimtorch.prune(model, "macs-0.5-taylor", data)`` runs them: this package is also that
function (the package and the verb share the name ``slimtorch.prune``, so the module is made
callable and forwards to ``slimtorch.api.prune``)."""
from __future__ import annotations

import sys
import types


def pruning_record(model) -> dict | None:
    """The record of the first method that shrank a model ``slimtorch.prune`` returned
    (``prune``, ``hesso``, ``lowrank``: params and MACs before/after; groups and excluded
    layers, or ranks); None for a model that was not pruned."""
    from ..methods import method_handler
    from ..quant.prepare import META_ATTR
    for r in getattr(model, META_ATTR, {}).get("methods", []):
        if method_handler(r["name"]).config.shrinks:
            return r["stats"]
    return None


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import prune
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
