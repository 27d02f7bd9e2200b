"""fuse_shortcut: the seed's pooled, zero-padded shortcut read by the add that consumes it.

What: the seed's basic unit (`_residual`) makes its shortcut by an average pool over the
stride's blocks and zero channels on both sides, then adds it. Written as it is built, that is
two passes over memory for a tensor the add reads once. This pass gives the add the unpooled
tensor instead and lets it read it through the pool and the channel offset:

    avg_pool(x) -> p; pad_channels(p) -> q; add(y, q) -> s
                                            add_pooled(y, x) {k, before, after} -> s

A pad alone (a stride-1 unit that widens: k = 1) or a pool alone (before = after = 0) is
rewritten the same way. `add_pooled` is an epilogue op, so `fuse_epilogues` then puts it into
the convolution that makes y like any residual add: the kernel that makes the sum reads x's
k x k blocks at the output pixel's position and its channel less `before`.

Refusals, each reported: the pooled or padded value has another reader or is a public output
(it is then written anyway, and the add reads it as it is), or is made in another phase than
the add. In training the backward pass reads neither (their gradients need only shapes), so
the forward's shortcut fuses there too.
Numerics: none. add_pooled's reference is avg_pool's, pad_channels' and add's references in
that order (`ops/fused.py`).
"""

from __future__ import annotations

from ..ir import Graph, Node
from .base import PassResult
from .rewrite import make_node, rebuild

# The shortcut's ops, outermost first, and the attributes of add_pooled each one gives.
SHORTCUT_OPS = {"pad_channels": lambda a: {"before": a["before"], "after": a["after"]},
                "avg_pool": lambda a: {"k": a["k"]}}
PLAIN = {"k": 1, "before": 0, "after": 0}


def fuse_shortcut(graph: Graph) -> PassResult:
    producers, consumers = graph.producers(), graph.consumers()
    protected = set(graph.outputs.values())
    values = dict(graph.values)
    placed, dropped, remarks = {}, set(), []
    for node in graph.nodes:
        if node.op != "add":
            continue
        for y, other in (node.inputs, node.inputs[::-1]):
            chain = _chain(node, other, producers, consumers, protected, remarks)
            if chain:
                placed[node.name] = _fused(values, node, y, chain)
                dropped.update(n.name for n in chain)
                break
    if not placed:
        return PassResult(graph, False, remarks)
    nodes = [placed.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _chain(add: Node, value: str, producers, consumers, protected, remarks) -> list[Node]:
    """The shortcut ops that make `value` for `add` alone, outermost first, each op at most
    once and in SHORTCUT_OPS' order."""
    chain, reader = [], add
    for op in SHORTCUT_OPS:
        node = producers.get(value)
        if node is None or node.op != op:
            continue
        readers = [u.name for u in consumers[value] if u.name != reader.name]
        why = (f"{value} is also read by {', '.join(readers)}" if readers else
               f"{value} is a public output" if value in protected else
               f"it is in the {node.phase} phase, the add in {add.phase}"
               if node.phase != add.phase else None)
        if why:
            remarks.append((node.name, f"not read through {add.name}: {why}"))
            break
        chain.append(node)
        reader, value = node, node.inputs[0]
    return chain


def _fused(values, add: Node, y: str, chain: list[Node]) -> Node:
    attrs = dict(PLAIN)
    for node in chain:
        attrs.update(SHORTCUT_OPS[node.op](node.attrs))
    return make_node(values, "add_pooled", [y, chain[-1].inputs[0]], attrs, name=add.name,
                     scope=add.scope, phase=add.phase, outputs=list(add.outputs))
