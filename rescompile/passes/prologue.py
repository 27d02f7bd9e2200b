"""fuse_prologues (training): a per-channel chain (a batch norm and its ReLU) read only by
1 x 1 convolutions and their weight gradients runs in those kernels, on their input as they
read it, and its output is never written.

In training every layer runs over the whole batch, so `fused_elementwise(x)` -> `relu` is a
pass over memory of its own (ResNet-164's first stage: 64 channels of 128 x 32 x 32 pixels,
read and written), and `relu` stays alive from the forward pass to the weight gradient that
reads it. Where every reader of `relu` is a 1 x 1 convolution (a pre-activation unit's conv1
and projection shortcut, a bottleneck's conv3) or its weight gradient, each reader becomes
`prologue_<op>`, reading `x` and applying the chain itself; the batch-norm gradient already
recomputes what it needs from `x`.

Preconditions, each refusal reported: the chain's operands are all per-channel vectors; it
makes one output, no second output and no statistics; the output is not a public output; every
reader reads it as its first input only, through a 1 x 1 window with no padding (a padded
window would apply the chain to the zero border).
Numerics: none. The prologue is the chain's reference on the input, stored as the tensor was
(`ops/fused_train.py`), so the graph's numbers do not move by a bit.
"""

from __future__ import annotations

from ..ir import Graph, Node
from ..padding import pads_2d
from .base import PassResult
from .rewrite import make_node, rebuild

# a reader's op -> the op that reads its first input through a prologue
READERS = {"conv2d": "prologue_fused_conv2d", "fused_conv2d": "prologue_fused_conv2d",
           "conv2d_grad_filter": "prologue_conv2d_grad_filter"}


def fuse_prologues(graph: Graph) -> PassResult:
    consumers = graph.consumers()
    protected = set(graph.outputs.values())
    values = dict(graph.values)
    replaced: dict[str, Node] = {}
    dropped, remarks = set(), []
    for node in graph.nodes:
        if node.op != "fused_elementwise":
            continue
        readers = consumers.get(node.outputs[0], [])
        reason = _refusal(graph, node, readers, protected)
        if reason:
            remarks.append((node.name, f"not fused into its readers: {reason}"))
            continue
        for reader in readers:
            replaced[reader.name] = _with_prologue(values, replaced.get(reader.name, reader),
                                                   node)
        dropped.add(node.name)
    if not replaced:
        return PassResult(graph, False, remarks)
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _refusal(graph: Graph, chain: Node, readers: list[Node], protected) -> str | None:
    attrs, out = chain.attrs, chain.outputs[0]
    if attrs.get("out2") or attrs.get("stats") or len(chain.outputs) > 1:
        return "it makes more than one output"
    if out in protected:
        return f"{out} is a public output"
    if any(len(graph.value(v).shape) != 1 for v in chain.inputs[1:]):
        return "an operand is not a per-channel vector"
    if not readers:
        return "nothing reads it"
    for reader in readers:
        if reader.op not in READERS:
            return f"{reader.name} ({reader.op}) takes no prologue"
        if reader.inputs[0] != out or out in reader.inputs[1:]:
            return f"{reader.name} reads it other than as its input"
        if not _one_by_one(graph, reader):
            return f"{reader.name} reads it through a window wider than 1 x 1, or padded"
    return None


def _one_by_one(graph: Graph, reader: Node) -> bool:
    """Whether the reader's window is one unpadded pixel."""
    k = reader.attrs["k"] if "k" in reader.attrs else graph.value(reader.inputs[1]).shape[0]
    _, h, w, _ = graph.value(reader.inputs[0]).shape
    return k == 1 and not any(pads_2d(h, w, 1, reader.attrs["stride"],
                                      reader.attrs["padding"]))


def _with_prologue(values, reader: Node, chain: Node) -> Node:
    """The reader on the chain's input, the chain's operands appended to its inputs."""
    x, *operands = chain.inputs
    offset = len(reader.inputs) - 1  # the chain's arg i (>= 1) -> the reader's input offset + i
    steps = [{**step, "args": [offset + i for i in step["args"]]}
             for step in chain.attrs["epilogue"]]
    attrs = dict(reader.attrs, prologue=steps)
    op = READERS[reader.op]
    if op == "prologue_fused_conv2d":
        attrs.setdefault("epilogue", [])  # a plain conv2d is fused_conv2d with no epilogue
    return make_node(values, op, [x, *reader.inputs[1:], *operands], attrs, name=reader.name,
                     scope=reader.scope, phase=reader.phase, outputs=reader.outputs)
