"""A tiny ONNX node emitter: unique names across nested subgraphs, constants in the right dtype.

Lowerings are written against this instead of onnxscript `@script` because they need Loop scan
outputs and an If inside the Loop body, which onnxscript's script mode cannot express.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


class GraphBuilder:
    """Collects nodes for one (sub)graph. Children share the parent's name counter, so every value
    name is unique across the whole model, as ONNX requires for nested scopes."""

    def __init__(self, prefix: str, counter: itertools.count | None = None):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter if counter is not None else itertools.count()

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def op(self, op_type: str, *inputs: str | None, n_out: int = 1, domain: str = "", **attrs):
        outputs = [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, [i or "" for i in inputs], outputs, name=self.name(f"node_{op_type}"),
                domain=domain or None, **attrs,
            )
        )
        return outputs[0] if n_out == 1 else outputs

    def const(self, value, dtype) -> str:
        out = self.name("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name=out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.name("node_Constant"), value=tensor))
        return out

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant, for shapes, axes, starts and ends."""
        return self.const(list(values), np.int64)

    def child(self, hint: str) -> GraphBuilder:
        return GraphBuilder(f"{self.prefix}/{hint}", self._counter)

    def graph(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]):
        return helper.make_graph(self.nodes, name, inputs, outputs)


def value_info(name: str, elem_type: int, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)
