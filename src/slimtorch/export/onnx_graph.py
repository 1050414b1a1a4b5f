"""The ONNX graph view the export passes share (``onnx_rewrite``, ``onnx_speed``): producers,
consumers, initializer arrays, fresh names, node replacement. A leaf of the export package."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Index of an ONNX graph: producers, consumers and initializer arrays."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.g = model, model.graph
        self._counter = 0
        self.reindex()

    def reindex(self) -> None:
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)

    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer (looking through Identity nodes), else None."""
        t = self.inits.get(self.resolve(name))
        return None if t is None else numpy_helper.to_array(t)

    def resolve(self, name: str) -> str:
        n = self.producer.get(name)
        while n is not None and n.op_type == "Identity":
            name, n = n.input[0], self.producer.get(n.input[0])
        return name

    def add_init(self, arr: np.ndarray | onnx.TensorProto, hint: str) -> str:
        self._counter += 1
        name = f"{hint}__st{self._counter}"
        t = arr if isinstance(arr, onnx.TensorProto) else numpy_helper.from_array(arr)
        t.name = name
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}__st{self._counter}"

    def weight_dq(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing ``name`` from an integer initializer, if any."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or self.array(n.input[0]) is None:
            return None
        return n

    def act_dq(self, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
        """(Q, DQ) pair producing activation ``name`` (DQ fed by a Q node), if any."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        return (q, dq) if q is not None and q.op_type == "QuantizeLinear" else None


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def replace_node(gr: Graph, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    nodes = list(gr.g.node)
    i = next(k for k, n in enumerate(nodes) if list(n.output) == list(old.output))
    del gr.g.node[:]
    gr.g.node.extend(nodes[:i] + new + nodes[i + 1:])
