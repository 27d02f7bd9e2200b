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

In training, the shortcut's gradient is the reverse chain, which becomes one kernel the same
way (its result is a tensor the gradient add reads, so it is written once, not twice):

    crop_channels(dy) -> c; avg_pool_grad(c) -> d     pool_pad_grad(dy) {k, in_hw, before, after}

Refusals, each reported: the pooled, padded or cropped value has another reader or is a public
output (it is then written anyway, and is read as it is), or is made in another phase than
its reader. In training the backward pass reads neither forward value (their gradients need
only shapes), so the forward's shortcut fuses there too.
Numerics: none. add_pooled's reference is avg_pool's, pad_channels' and add's references in
that order, pool_pad_grad's crop_channels' then avg_pool_grad's (`ops/fused.py`).
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

    def alone(reader: Node, value: str) -> Node | None:
        """What makes `value`, if `reader` alone reads it and may take its place; a refusal
        is reported."""
        node = producers.get(value)
        readers = [u.name for u in consumers[value] if u.name != reader.name]
        why = (f"{value} is also read by {', '.join(readers)}" if readers else
               f"{value} is a public output" if value in protected else
               f"it is in the {node.phase} phase, {reader.name} in {reader.phase}"
               if node.phase != reader.phase else None)
        if why:
            remarks.append((node.name, f"not fused into {reader.name}: {why}"))
        return None if why else node

    for node in graph.nodes:
        made = _pooled_add(values, node, producers, alone) if node.op == "add" else \
            _pool_pad_grad(values, node, producers, alone) if node.op == "avg_pool_grad" else None
        if made:
            fused, absorbed = made
            placed[node.name] = fused
            dropped.update(n.name for n in absorbed)
    if not placed:
        return PassResult(graph, False, remarks)
    nodes = [placed.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _pooled_add(values, add: Node, producers, alone):
    """add(y, pad_channels(avg_pool(x))) as add_pooled(y, x), and the nodes it absorbs."""
    for y, other in (add.inputs, add.inputs[::-1]):
        chain, reader, value = [], add, other
        for op in SHORTCUT_OPS:
            maker = producers.get(value)
            if maker is None or maker.op != op:
                continue
            if alone(reader, value) is None:
                break
            chain.append(maker)
            reader, value = maker, maker.inputs[0]
        if chain:
            attrs = dict(PLAIN)
            for node in chain:
                attrs.update(SHORTCUT_OPS[node.op](node.attrs))
            return make_node(values, "add_pooled", [y, value], attrs, name=add.name,
                             scope=add.scope, phase=add.phase, outputs=list(add.outputs)), chain
    return None


def _pool_pad_grad(values, grad: Node, producers, alone):
    """avg_pool_grad(crop_channels(dy)) as pool_pad_grad(dy), and the crop it absorbs."""
    crop = producers.get(grad.inputs[0])
    if crop is None or crop.op != "crop_channels" or alone(grad, grad.inputs[0]) is None:
        return None
    return make_node(values, "pool_pad_grad", list(crop.inputs), {**grad.attrs, **crop.attrs},
                     name=grad.name, scope=grad.scope, phase=grad.phase,
                     outputs=list(grad.outputs)), [crop]
