"""Gradient fusions: split_bn_grad, fuse_grad_adds, fuse_bn_grad_sums.

The backward pass of a pre-activation unit reads every activation gradient twice as often as
it needs to: a batch-norm gradient sums its input over the batch before it can scale it, and
where a value had two readers in the forward pass, its two gradients meet in an `add`. Three
rewrites let those passes over memory join the kernels next to them:

- split_bn_grad: `batch_norm_grad` (and `batch_norm_relu_grad`) -> its two halves
  (`ops/fused_train.GRAD_HALVES`): the per-channel sums (dgamma, dbeta) and the elementwise
  apply (dx from them), so each half can join a different kernel.
- fuse_grad_adds: `add(g, other)` where g is the first output of a data gradient
  (`conv2d_grad_input`) or of a batch-norm gradient's apply, and the add is g's only reader,
  becomes that kernel's epilogue: `fused_conv2d_grad_input(dy, w, other)` with
  `epilogue=[add]`, which makes the sum in the add's place, so g is never stored.

      conv2d_grad_input(dy, w) -> g;  add(g, other) -> s     fused_conv2d_grad_input -> s

- fuse_bn_grad_sums: the sums half of a batch-norm gradient whose input is a data gradient's
  first output joins that kernel (`sums`), which reads its result in registers, as fuse_stats
  does for the forward statistics (`train_fusion.absorb_reductions`).

Order: the adds first, so the sums are taken of what the batch norm's gradient reads (the sum,
when its input was a gradient add).
Preconditions, each refusal reported: g has no other reader and is not a public output; the
kernel and the add are in one phase; `other` is not computed from the kernel's own outputs;
the kernel makes no reduction yet (its sums would then read the value before the add).
Numerics: none. Each fused op's reference is its parts' references in the same order
(`ops/fused_train.py`), so the training graph's numbers do not move by a bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, Node
from ..ops.fused_train import GRAD_HALVES
from ..ops.registry import epilogue_form, kind_of
from .base import PassResult
from .rewrite import computed_from, made_by, make_node, rebuild
from .train_fusion import absorb_reductions

# Kernels whose first output a gradient add can be folded into.
ADD_TAKERS = ("conv_grad_input", "norm_grad")


def split_bn_grad(graph: Graph) -> PassResult:
    values = dict(graph.values)
    nodes = []
    for node in graph.nodes:
        halves = GRAD_HALVES.get(node.op)
        nodes += _halves(values, node, *halves) if halves else [node]
    changed = len(nodes) > len(graph.nodes)
    return PassResult(rebuild(graph, nodes, values) if changed else graph, changed)


def _halves(values, grad: Node, sums_op: str, apply_op: str) -> list[Node]:
    dx, *sums = grad.outputs
    where = {"scope": grad.scope, "phase": grad.phase}
    return [make_node(values, sums_op, grad.inputs, grad.attrs, name=f"{grad.name}/sums",
                      outputs=sums, **where),
            make_node(values, apply_op, [*grad.inputs, *sums], grad.attrs, name=grad.name,
                      outputs=[dx], **where)]


def fuse_grad_adds(graph: Graph) -> PassResult:
    producers, consumers = graph.producers(), graph.consumers()
    context = _Context(consumers, set(graph.outputs.values()), made_by(graph.nodes),
                       {n.name: i for i, n in enumerate(graph.nodes)})
    values = dict(graph.values)
    placed: dict[str, Node] = {}  # add name -> the kernel that now makes its sum
    dropped, remarks = set(), []
    for node in graph.nodes:
        if node.op != "add":
            continue
        for made, other in (node.inputs, node.inputs[::-1]):
            kernel = producers.get(made)
            if kernel is None or kind_of(kernel.op) not in ADD_TAKERS:
                continue
            reason = _add_refusal(node, made, other, kernel, context)
            if reason:
                remarks.append((node.name, f"not fused into {kernel.name}: {reason}"))
                continue
            fused = _with_add(values, kernel, node, other)
            placed[node.name] = fused
            dropped.add(kernel.name)
            producers.update({v: fused for v in fused.outputs})
            break
    if not placed:
        return PassResult(graph, False, remarks)
    nodes = [placed.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


@dataclass(frozen=True)
class _Context:
    consumers: dict
    protected: set
    makers: dict
    position: dict


def _add_refusal(add: Node, made: str, other: str, kernel: Node, at: _Context) -> str | None:
    if epilogue_form(kernel.op) is None:
        return f"{kernel.op} has no form with an epilogue"
    if made != kernel.outputs[0]:
        return f"it reads {kernel.name}'s output {made}, not its first"
    readers = [u.name for u in at.consumers[made] if u.name != add.name]
    if readers:
        return f"{made} is also read by {', '.join(readers)}"
    if made in at.protected:
        return f"{made} is a public output"
    if kernel.phase != add.phase:
        return f"it is in the {add.phase} phase, the kernel in {kernel.phase}"
    if kernel.attrs.get("sums"):
        return f"{kernel.name} already sums its output"
    if computed_from(at.makers, other, set(kernel.outputs), at.position[kernel.name]):
        return f"operand {other} is computed from the kernel's own outputs"
    return None


def _with_add(values, kernel: Node, add: Node, other: str) -> Node:
    """The kernel in its epilogue form, the add its last epilogue step, making the sum."""
    inputs = list(kernel.inputs)
    if other not in inputs:
        inputs.append(other)
    step = {"op": add.op, "args": [inputs.index(other)], **add.attrs}
    attrs = {**kernel.attrs, "epilogue": [*kernel.attrs.get("epilogue", ()), step]}
    return make_node(values, epilogue_form(kernel.op), inputs, attrs, name=kernel.name,
                     scope=kernel.scope, phase=kernel.phase,
                     outputs=[add.outputs[0], *kernel.outputs[1:]])


def fuse_bn_grad_sums(graph: Graph) -> PassResult:
    return absorb_reductions(graph, "norm_grad_sums", "conv_grad_input", _with_sums,
                             "the sums stay a separate reduction")


def _with_sums(values, kernel: Node, sums: Node) -> Node:
    inputs = list(kernel.inputs)
    for v in sums.inputs[1:]:
        if v not in inputs:
            inputs.append(v)
    step = {"op": sums.op, "args": [inputs.index(v) for v in sums.inputs[1:]], **sums.attrs}
    attrs = {**kernel.attrs, "epilogue": kernel.attrs.get("epilogue", []), "sums": step}
    return make_node(values, epilogue_form(kernel.op), inputs, attrs, name=kernel.name,
                     scope=kernel.scope, phase=kernel.phase,
                     outputs=kernel.outputs + sums.outputs)
