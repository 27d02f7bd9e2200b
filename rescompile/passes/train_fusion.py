"""Training fusions: split_bn, fuse_relu_grad, fuse_stats.

A train-mode batch norm normalises with the statistics of its own batch, so no weight can hold
it (fold_bn refuses it). It can still share kernels once it is split in two:

- split_bn: `batch_norm(x)` -> `batch_moments(x)` (mean, var) + `batch_normalize(x, ...)`.
  The value names stay, so the moving-average updates and the gradient read what they read.
  A synchronised batch norm gets `sync_moments` between the two, on the rank's moments.
- fuse_relu_grad: `batch_norm_grad(relu_grad(dr, y), x, ...)`, where y is that batch norm's
  normalised output, becomes `batch_norm_relu_grad(dr, x, ...)`: the ReLU backward runs inside
  the BN gradient kernel, which recomputes y from x, so y need not be saved for the backward.
- fuse_stats: `batch_moments(conv(...))` joins the conv's kernel (`fused_conv2d` with
  `stats`), so the reduction reads the conv output while it is being written.
  (`fuse_elementwise` then merges `batch_normalize` with its ReLU.)

Preconditions, each refusal reported: the relu_grad's only consumer is the gradient of the batch
norm that produced its input; the moments' input is a conv kernel's first output, and that
kernel makes no other reduction (`absorb_reductions`, which the batch-norm gradient's sums
share: `grad_fusion.py`).
Numerics: none. Every new op runs the same NumPy arithmetic, in the same order, as the ops it
replaces (`ops/fused_train.py`), so the training graph's numbers do not move by a bit.
"""

from __future__ import annotations

from ..ir import Graph, Node
from ..ops.fused_train import GRAD_HALVES, RELU_FORMS
from ..ops.registry import epilogue_form, kind_of
from .base import PassResult
from .rewrite import make_node, rebuild


def split_bn(graph: Graph) -> PassResult:
    values = dict(graph.values)
    nodes = []
    for node in graph.nodes:
        if node.op == "batch_norm" and node.attrs["training"]:
            nodes += _split(values, node)
        else:
            nodes.append(node)
    changed = len(nodes) > len(graph.nodes)
    return PassResult(rebuild(graph, nodes, values) if changed else graph, changed)


def _split(values, bn: Node) -> list[Node]:
    x, gamma, beta = bn.inputs
    y, mean, var = bn.outputs
    where = {"scope": bn.scope, "phase": bn.phase}
    norm = make_node(values, "batch_normalize", [x, gamma, beta, mean, var],
                     {"epsilon": bn.attrs["epsilon"]}, name=bn.name, outputs=[y], **where)
    sync = bn.attrs.get("sync")
    local = [f"{mean}/rank", f"{var}/rank"] if sync else [mean, var]
    moments = make_node(values, "batch_moments", [x], {}, name=f"{bn.name}/moments",
                        outputs=local, **where)
    if not sync:
        return [moments, norm]
    synced = make_node(values, "sync_moments", local, {}, name=f"{bn.name}/sync",
                       outputs=[mean, var], **where)
    return [moments, synced, norm]


def fuse_relu_grad(graph: Graph) -> PassResult:
    producers, consumers = graph.producers(), graph.consumers()
    protected = set(graph.outputs.values())
    values = dict(graph.values)
    replaced: dict[str, Node] = {}  # a batch-norm gradient (or half) -> its relu form
    dropped, remarks = set(), []
    for node in graph.nodes:
        if node.op != "relu_grad":
            continue
        reason = _relu_grad_refusal(node, producers, consumers, protected)
        if reason:
            remarks.append((node.name, f"not fused into a batch-norm gradient: {reason}"))
            continue
        norm = producers[node.inputs[1]]
        for grad in consumers[node.outputs[0]]:
            # the relu form reads dr and the batch norm's inputs, then what the grad read
            # after them (an apply half's two sums)
            replaced[grad.name] = make_node(
                values, RELU_FORMS[grad.op], [node.inputs[0], *norm.inputs, *grad.inputs[5:]],
                {"epsilon": grad.attrs["epsilon"], "alpha": node.attrs["alpha"]},
                name=grad.name, scope=grad.scope, phase=grad.phase, outputs=grad.outputs)
        dropped.add(node.name)
    if not replaced:
        return PassResult(graph, False, remarks)
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _relu_grad_refusal(relu_grad: Node, producers, consumers, protected) -> str | None:
    """Refused unless the relu_grad's output is read only by the gradient of the batch norm
    that made its input: whole, or both halves (a synchronised batch norm's)."""
    out = relu_grad.outputs[0]
    users = consumers[out]
    ops = sorted(u.op for u in users)
    if ops not in ([whole] for whole in GRAD_HALVES) and ops not in (
            sorted(halves) for halves in GRAD_HALVES.values()) \
            or any(u.op not in RELU_FORMS or u.inputs[0] != out for u in users):
        return f"its output feeds {', '.join(ops)}, not one batch-norm gradient"
    if out in protected:
        return f"{out} is a public output"
    norm = producers.get(relu_grad.inputs[1])
    if norm is None or norm.op != "batch_normalize":
        return f"its input is made by {norm.op if norm else 'a graph input'}, not batch_normalize"
    x, gamma, _, mean, var = norm.inputs
    for grad in users:
        if (x, gamma, mean, var) != grad.inputs[1:5] or \
                norm.attrs["epsilon"] != grad.attrs["epsilon"]:
            return f"{grad.name} is not the gradient of {norm.name}"
    return None


def fuse_stats(graph: Graph) -> PassResult:
    return absorb_reductions(graph, "statistics", "conv", _with_stats,
                             "statistics stay a separate reduction")


def _with_stats(values, conv: Node, moments: Node) -> Node:
    attrs = {**conv.attrs, "epilogue": conv.attrs.get("epilogue", []), "stats": True}
    return make_node(values, epilogue_form(conv.op), conv.inputs, attrs, name=conv.name,
                     scope=conv.scope, phase=conv.phase, outputs=conv.outputs + moments.outputs)


def absorb_reductions(graph: Graph, reduction_kind: str, producer_kind: str, absorb,
                      refused: str) -> PassResult:
    """Each node of `reduction_kind` whose input is the first output of a kernel of
    `producer_kind` joins that kernel: `absorb(values, kernel, reduction)` is the kernel node
    that also makes the reduction's outputs, where the kernel stood. A refusal is reported as
    `refused: why`."""
    producers = graph.producers()
    values = dict(graph.values)
    replaced: dict[str, Node] = {}  # kernel name -> the kernel with the reduction
    dropped, remarks = set(), []
    for node in graph.nodes:
        if kind_of(node.op) != reduction_kind:
            continue
        kernel = producers.get(node.inputs[0])
        reason = _reduction_refusal(node, kernel, producer_kind, replaced)
        if reason:
            remarks.append((node.name, f"{refused}: {reason}"))
            continue
        replaced[kernel.name] = absorb(values, kernel, node)
        dropped.add(node.name)
    if not replaced:
        return PassResult(graph, False, remarks)
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return PassResult(rebuild(graph, nodes, values), True, remarks)


def _reduction_refusal(reduction: Node, kernel: Node | None, producer_kind: str,
                       replaced) -> str | None:
    if kernel is None:
        return f"its input {reduction.inputs[0]} is a graph input"
    if kind_of(kernel.op) != producer_kind:
        return f"producer is {kernel.op}"
    if kernel.outputs[0] != reduction.inputs[0]:
        return f"it reads {kernel.name}'s second output"
    if kernel.attrs.get("stats") or kernel.attrs.get("sums") or kernel.name in replaced:
        return f"{kernel.name} already makes a reduction"
    return None
