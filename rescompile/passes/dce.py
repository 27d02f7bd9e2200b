"""dce: dead-code elimination.

What: drop every node none of whose outputs leads to a public output (`graph.outputs`).
Preconditions: none; ops have no side effects (updates are outputs, `new/...`).
Numerics: none; the nodes kept compute exactly what they did.
"""

from __future__ import annotations

from ..ir import Graph
from .base import PassResult


def dce(graph: Graph) -> PassResult:
    needed = set(graph.outputs.values())
    kept = []
    for node in reversed(graph.nodes):
        if needed.intersection(node.outputs):
            needed.update(node.inputs)
            kept.append(node)
    kept.reverse()
    dropped = len(graph.nodes) - len(kept)
    return PassResult(graph.with_nodes(kept) if dropped else graph, dropped > 0)
