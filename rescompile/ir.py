"""The graph IR: values, nodes, and a graph that keeps its nodes in topological order.

A shape is a tuple whose first entry may be the symbol "N" (the batch size, bound only when a
graph runs or is planned). Every value has one definition: a graph input or one node's output.
Graph inputs carry a role: "data" (images, labels, seeds), "param" (trainable), "state"
(moving statistics, optimizer slots) or "hyper" (learning rate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import ops
from .errors import GraphError

BATCH = "N"
ROLES = ("data", "param", "state", "hyper")
PHASES = ("prepare", "forward", "loss", "backward", "update")


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple
    dtype: str

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in self.shape)


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict, hash=False, compare=False)
    scope: str = ""
    phase: str = "forward"

    @property
    def unit(self) -> str:
        return self.scope.split("/", 1)[0]

    def replace(self, **changes) -> Node:
        return dataclasses.replace(self, **changes)


@dataclass
class Graph:
    values: dict[str, Value] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # value name -> role
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # public key -> value name
    dtype: str = "float64"

    # -- construction -----------------------------------------------------------------------
    def add_input(self, name: str, shape: tuple, role: str, dtype: str | None = None) -> str:
        if role not in ROLES:
            raise GraphError(f"input {name!r}: role must be one of {ROLES}, got {role!r}")
        self._define(Value(name, tuple(shape), dtype or self.dtype), f"input {name!r}")
        self.inputs[name] = role
        return name

    def add_node(self, op: str, inputs, attrs=None, *, name: str, scope: str = "",
                 phase: str = "forward", outputs=None) -> tuple[str, ...]:
        """Append a node; its output shapes come from the op's shape rule."""
        attrs = dict(attrs or {})
        in_values = [self.value(v, f"node {name!r}") for v in inputs]
        shapes = ops.get(op).infer(attrs, in_values, name)
        if outputs is None:
            outputs = default_output_names(name, ops.get(op).output_names(attrs, len(shapes)))
        dtype = attrs.get("dtype") or (in_values[0].dtype if in_values else self.dtype)
        for out, shape in zip(outputs, shapes):
            self._define(Value(out, tuple(shape), dtype), f"node {name!r}")
        self.nodes.append(Node(name, op, tuple(inputs), tuple(outputs), attrs, scope, phase))
        return tuple(outputs)

    def _define(self, value: Value, where: str) -> None:
        if value.name in self.values:
            raise GraphError(f"{where}: value {value.name!r} is already defined")
        self.values[value.name] = value

    # -- queries ----------------------------------------------------------------------------
    def value(self, name: str, where: str = "graph") -> Value:
        try:
            return self.values[name]
        except KeyError:
            raise GraphError(f"{where}: unknown value {name!r}") from None

    def inputs_with_role(self, role: str) -> list[str]:
        return [n for n, r in self.inputs.items() if r == role]

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {name: [] for name in self.values}
        for node in self.nodes:
            for v in node.inputs:
                users[v].append(node)
        return users

    def count_ops(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def copy(self) -> Graph:
        return Graph(dict(self.values), dict(self.inputs), list(self.nodes), dict(self.outputs),
                     self.dtype)

    def with_nodes(self, nodes: list[Node]) -> Graph:
        """A graph with new nodes; values no longer defined by an input or node are dropped."""
        defined = set(self.inputs) | {o for n in nodes for o in n.outputs}
        values = {k: v for k, v in self.values.items() if k in defined}
        return Graph(values, dict(self.inputs), list(nodes), dict(self.outputs), self.dtype)


def default_output_names(node_name: str, suffixes: list[str]) -> list[str]:
    """The first output is named like its node; further ones get ':suffix'."""
    return [node_name if i == 0 else f"{node_name}:{s}" for i, s in enumerate(suffixes)]


def verify(graph: Graph) -> None:
    """Check single definition, topological order, shapes, dtypes and outputs."""
    defined: dict[str, str] = {}
    for name in graph.inputs:
        if name not in graph.values:
            raise GraphError(f"input {name!r} has no value")
        defined[name] = "graph input"
    for node in graph.nodes:
        _verify_node(graph, node, defined)
    for key, name in graph.outputs.items():
        if name not in defined:
            raise GraphError(f"output {key!r}: value {name!r} is not defined")


def _verify_node(graph: Graph, node: Node, defined: dict[str, str]) -> None:
    where = f"node {node.name!r} ({node.op})"
    if node.op not in ops.OPS:
        raise GraphError(f"{where}: unknown op")
    if node.phase not in PHASES:
        raise GraphError(f"{where}: phase {node.phase!r} is not one of {PHASES}")
    for v in node.inputs:
        if v not in defined:
            raise GraphError(f"{where}: input {v!r} is used before it is defined "
                             "(graph not in topological order, or a cycle)")
    in_values = [graph.value(v, where) for v in node.inputs]
    dtypes = {v.dtype for v in in_values}
    if len(dtypes) > 1:
        raise GraphError(f"{where}: inputs mix dtypes {sorted(dtypes)}")
    shapes = ops.get(node.op).infer(node.attrs, in_values, node.name)
    if len(shapes) != len(node.outputs):
        raise GraphError(f"{where}: op gives {len(shapes)} outputs, node lists {len(node.outputs)}")
    for out, shape in zip(node.outputs, shapes):
        if out in defined:
            raise GraphError(f"{where}: output {out!r} already defined by {defined[out]}")
        recorded = graph.value(out, where)
        if recorded.shape != tuple(shape):
            raise GraphError(f"{where}: output {out!r} has shape {list(recorded.shape)}, "
                             f"shape rule gives {list(shape)}")
        if in_values and recorded.dtype != in_values[0].dtype and "dtype" not in node.attrs:
            raise GraphError(f"{where}: output {out!r} is {recorded.dtype}, inputs are "
                             f"{in_values[0].dtype}")
        defined[out] = where
