"""Split a layer that reads a channel concatenation into one layer per part.

A Conv/Linear whose input is ``cat([x₁, …, x_k], channel dim)`` computes
W·cat(x₁, …, x_k) + b = Σ_i W_i x_i + b, with W_i the weight's input-channel slice of part i.
``ConcatSplit`` holds one layer per part (the bias on the first) and sums them, so each part
gets its own activation quantizer and its own per-channel weight scales: Q-Diffusion's
shortcut splitting (Li et al., ICCV 2023, Sec. 3.3), where a UNet up-block's skip connection
and the upsampled features have very different ranges. The rewrite is exact up to float
rounding. Which layers read a concatenation is found in the captured graph, never by name;
``load`` replays it from the metadata (``meta["split_concat"]``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .capture import QuantGraph, view_source
from .rewrite import set_submodule


class ConcatSplit(nn.Module):
    """Σ_i layer_i(part_i of x): x split along ``dim`` into ``sizes``."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Linear, sizes: list[int]):
        super().__init__()
        self.sizes, self.dim = list(sizes), (-1 if isinstance(layer, nn.Linear) else 1)
        self.parts = nn.ModuleList(_slice(layer, a, n, first=(k == 0))
                                   for k, (a, n) in enumerate(_offsets(sizes)))

    def forward(self, x: Tensor) -> Tensor:
        xs = x.split(self.sizes, dim=self.dim)
        out = self.parts[0](xs[0])
        for layer, xi in zip(self.parts[1:], xs[1:]):
            out = out + layer(xi)
        return out


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, n))
        a += n
    return out


@torch.no_grad()
def _slice(layer: nn.Module, start: int, n: int, first: bool) -> nn.Module:
    """A copy of ``layer`` reading input channels start … start+n−1 (bias only if first)."""
    bias = layer.bias is not None and first
    if isinstance(layer, nn.Linear):
        new = nn.Linear(n, layer.out_features, bias=bias)
    else:
        new = type(layer)(n, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, 1, bias, layer.padding_mode)
    new.weight.copy_(layer.weight[:, start:start + n])
    if bias:
        new.bias.copy_(layer.bias)
    return new.to(layer.weight.dtype)


def concat_readers(graph: QuantGraph, model: nn.Module) -> list[dict]:
    """{fqn, sizes} of every Conv/Linear (ungrouped) whose input is a concatenation of two or
    more activations along its channel dimension."""
    out = []
    for l in graph.layers:
        mod = model.get_submodule(l["fqn"])
        node = graph.nodes[l["node"]]
        if not node.inputs or getattr(mod, "groups", 1) != 1 or isinstance(mod, ConcatSplit):
            continue
        src = graph.nodes[view_source(graph.nodes, node.inputs[0])]
        if src.op not in ("cat", "concat") or len(src.inputs) < 2:
            continue
        dim = _cat_dim(src)
        rank = len(src.shape)
        channel = rank - 1 if isinstance(mod, nn.Linear) else 1
        if dim % rank != channel or not all(graph.nodes[i].dynamic for i in src.inputs):
            continue
        sizes = [graph.nodes[i].shape[channel] for i in src.inputs]
        out.append({"fqn": l["fqn"], "sizes": sizes})
    return out


def _cat_dim(node) -> int:
    meta = node.meta or {}
    args, kwargs = meta.get("args", ()), meta.get("kwargs", {})
    return int(kwargs.get("dim", args[0] if args else 0))


def split_concat(model: nn.Module, splits: list[dict]) -> None:
    """Replace each ``{fqn, sizes}`` layer by its ConcatSplit (the artifact replays this)."""
    for s in splits:
        set_submodule(model, s["fqn"], ConcatSplit(model.get_submodule(s["fqn"]), s["sizes"]))
