"""Graph surgery the passes share: make a node whose output values follow the op's shape rule,
and rebuild a graph from a rewritten node list in a stable topological order (a fused node may
be placed where its last member stood; whatever it now feeds moves after it).
"""

from __future__ import annotations

import heapq

from .. import ops
from ..errors import GraphError
from ..ir import Graph, Node, Value, default_output_names


def make_node(values: dict[str, Value], op: str, inputs, attrs: dict, *, name: str,
              scope: str, phase: str, outputs=None) -> Node:
    """A node whose output values are (re)defined in `values` from the op's shape rule."""
    in_values = [values[v] for v in inputs]
    shapes = ops.get(op).infer(attrs, in_values, name)
    if outputs is None:
        outputs = default_output_names(name, ops.get(op).output_names(attrs, len(shapes)))
    dtype = attrs.get("dtype") or in_values[0].dtype
    for out, shape in zip(outputs, shapes):
        values[out] = Value(out, tuple(shape), dtype)
    return Node(name, op, tuple(inputs), tuple(outputs), attrs, scope, phase)


def rebuild(graph: Graph, nodes: list[Node], values: dict[str, Value]) -> Graph:
    """`graph` with new nodes (sorted) and values; values nothing defines any more are dropped."""
    draft = Graph(values, dict(graph.inputs), toposort(nodes), dict(graph.outputs), graph.dtype)
    return draft.with_nodes(draft.nodes)


def toposort(nodes: list[Node]) -> list[Node]:
    """Kahn's algorithm, always taking the ready node that came first in `nodes`, so an already
    sorted list comes back unchanged."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.outputs}
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    waiting = []
    for i, node in enumerate(nodes):
        deps = {producer[v] for v in node.inputs if v in producer}
        for d in deps:
            users[d].append(i)
        waiting.append(len(deps))
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if waiting[i])
        raise GraphError(f"node {stuck.name!r} ({stuck.op}) is on a cycle")
    return order


def made_by(nodes) -> dict[str, tuple[int, tuple[str, ...]]]:
    """value -> (position of the node that makes it, that node's inputs)."""
    return {o: (i, n.inputs) for i, n in enumerate(nodes) for o in n.outputs}


def computed_from(makers, value: str, own: set[str], start: int) -> bool:
    """Whether `value` is computed from the values `own`, all made at or after position
    `start` (`makers` as `made_by` gives it). A value made before `start` cannot be: nodes
    are in topological order."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in own:
            return True
        if v in seen or v not in makers:
            continue
        seen.add(v)
        position, inputs = makers[v]
        if position > start:
            stack.extend(inputs)
    return False
