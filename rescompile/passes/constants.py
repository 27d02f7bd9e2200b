"""fold_constants (infer): make the parameter-only subgraph visible.

What: every node computed from variables alone (fold_bn_weights, bn_affine_params) is marked
phase "prepare". The runtime's prepare entry (`parameter_only`, here) evaluates exactly these
once per variable load, so the forward pass reads the folded weights as constants; the mark
makes that split visible in dumps and lets backends and the memory planner treat those values
as weights, not activations.
Preconditions: infer graphs only (in training the variables change every step).
Numerics: none; it changes where a node runs, not what it computes.
"""

from __future__ import annotations

from ..ir import Graph, Node
from .base import PassResult

PREPARE = "prepare"


def parameter_only(graph: Graph) -> tuple[Node, ...]:
    """Nodes computed from variables alone (folded BN weights, say): constants between loads."""
    constant = {n for n, role in graph.inputs.items() if role in ("param", "state")}
    nodes = []
    for node in graph.nodes:
        if node.inputs and constant.issuperset(node.inputs):
            constant.update(node.outputs)
            nodes.append(node)
    return tuple(nodes)


def fold_constants(graph: Graph) -> PassResult:
    constant = {n.name for n in parameter_only(graph)}
    nodes = [n.replace(phase=PREPARE) if n.name in constant else n for n in graph.nodes]
    changed = any(a.phase != b.phase for a, b in zip(graph.nodes, nodes))
    return PassResult(graph.with_nodes(nodes) if changed else graph, changed)
