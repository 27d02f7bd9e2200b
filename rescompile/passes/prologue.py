"""fuse_prologues: a per-channel chain (a batch norm and its ReLU) read only by 1 x 1
convolutions and their weight gradients runs in those kernels, on their input as they read it,
and its output is never written.

In training every layer runs over the whole batch, so `fused_elementwise(x)` -> `relu` is a
pass over memory of its own (ResNet-164's first stage: 64 channels of 128 x 32 x 32 pixels,
read and written), and `relu` stays alive from the forward pass to the weight gradient that
reads it. Where every reader of `relu` is a 1 x 1 convolution (a pre-activation unit's conv1
and projection shortcut, a bottleneck's conv3) or its weight gradient, each reader becomes
`prologue_<op>`, reading `x` and applying the chain itself; the batch-norm gradient already
recomputes what it needs from `x`.

In inference the same chain (the next unit's BN-ReLU, folded to an affine) is a conv's second
output (`out2`, `fuse.py`): conv3 makes the residual stream and its activation, two outputs a
pixel from one register tile, and the activation is written and read back once more by the
next conv1. Where the activation's readers all take a prologue, the conv keeps one output and
the readers apply the chain as they load their input: the expanding conv3's epilogue, which
set its pace, halves, for a staging pass in conv1 over its input rows (ResNet-164 at batch
128 on a Zen 4: 5-7% less kernel time on AVX-512 in float32 and bfloat16, 3-5% on AVX2).

Preconditions, each refusal reported: the chain's operands are all per-channel vectors; it
makes one output, no second output and no statistics (an elementwise chain's own); the output
is not a public output; every reader reads it as its first input only, through a 1 x 1
window with no padding (a padded window would apply the chain to the zero border).
Numerics: none. The prologue is the chain's reference on the input, stored as the tensor was
(`ops/fused_train.py`), and a second output is made of the first as stored, so the graph's
numbers do not move by a bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, Node
from ..ops.registry import get, kind_of
from ..padding import pads_2d
from .base import PassResult
from .rewrite import make_node, rebuild

# a reader's op -> the op that reads its first input through a prologue
READERS = {"conv2d": "prologue_fused_conv2d", "fused_conv2d": "prologue_fused_conv2d",
           "conv2d_grad_filter": "prologue_conv2d_grad_filter"}


@dataclass(frozen=True)
class _Chain:
    """A chain a prologue may take: made by `source` (an elementwise kernel, or a conv as its
    second output) from `x` and per-step `operands` (a step's arg i >= 1 is operand i - 1)."""
    source: Node
    x: str
    operands: tuple[str, ...]
    steps: tuple[dict, ...]
    out: str

    @property
    def second_output(self) -> bool:
        return self.source.op != "fused_elementwise"


def fuse_prologues(graph: Graph) -> PassResult:
    consumers = graph.consumers()
    protected = set(graph.outputs.values())
    values = dict(graph.values)
    replaced: dict[str, Node] = {}
    dropped, remarks = set(), []
    for chain in _chains(graph):
        readers = consumers.get(chain.out, [])
        reason = _refusal(graph, chain, readers, protected)
        if reason:
            remarks.append((chain.source.name, f"not fused into its readers: {reason}"))
            continue
        for reader in readers:
            replaced[reader.name] = _with_prologue(values, replaced.get(reader.name, reader),
                                                   chain)
        if chain.second_output:
            replaced[chain.source.name] = _without_second_output(values, chain.source)
        else:
            dropped.add(chain.source.name)
    if not replaced:
        return PassResult(graph, False, remarks)
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _chains(graph: Graph) -> list[_Chain]:
    """Every elementwise kernel's chain, and every conv's second output."""
    chains = []
    for node in graph.nodes:
        if node.op == "fused_elementwise":
            chains.append(_Chain(node, node.inputs[0], node.inputs[1:],
                                 tuple(node.attrs["epilogue"]), node.outputs[0]))
        elif kind_of(node.op) == "conv" and node.attrs.get("out2"):
            used = [node.inputs[i] for step in node.attrs["out2"] for i in step["args"]]
            operands = tuple(dict.fromkeys(used))
            steps = tuple({**step, "args": [1 + operands.index(node.inputs[i])
                                            for i in step["args"]]}
                          for step in node.attrs["out2"])
            chains.append(_Chain(node, node.outputs[0], operands, steps, node.outputs[1]))
    return chains


def _refusal(graph: Graph, chain: _Chain, readers: list[Node], protected) -> str | None:
    attrs, out = chain.source.attrs, chain.out
    if not chain.second_output and (attrs.get("out2") or attrs.get("stats")
                                    or len(chain.source.outputs) > 1):
        return "it makes more than one output"
    if attrs.get("stats"):
        return "its conv makes statistics too"
    if out in protected:
        return f"{out} is a public output"
    if any(len(graph.value(v).shape) != 1 for v in chain.operands):
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


def _with_prologue(values, reader: Node, chain: _Chain) -> Node:
    """The reader on the chain's input, the chain's operands appended to its inputs."""
    offset = len(reader.inputs) - 1  # the chain's arg i (>= 1) -> the reader's input offset + i
    steps = [{**step, "args": [offset + i for i in step["args"]]} for step in chain.steps]
    attrs = dict(reader.attrs, prologue=steps)
    op = READERS[reader.op]
    if op == "prologue_fused_conv2d":
        attrs.setdefault("epilogue", [])  # a plain conv2d is fused_conv2d with no epilogue
    return make_node(values, op, [chain.x, *reader.inputs[1:], *chain.operands], attrs,
                     name=reader.name, scope=reader.scope, phase=reader.phase,
                     outputs=reader.outputs)


def _without_second_output(values, conv: Node) -> Node:
    """The conv making its first output alone: its inputs those its head and epilogue read."""
    head = len(get(conv.op).inputs)
    used = sorted(set(range(head)) | {i for step in conv.attrs["epilogue"]
                                      for i in step["args"]})
    steps = [{**step, "args": [used.index(i) for i in step["args"]]}
             for step in conv.attrs["epilogue"]]
    attrs = {k: v for k, v in conv.attrs.items() if k != "out2"}
    return make_node(values, conv.op, [conv.inputs[i] for i in used],
                     dict(attrs, epilogue=steps), name=conv.name, scope=conv.scope,
                     phase=conv.phase, outputs=conv.outputs[:1])
