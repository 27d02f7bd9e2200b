"""Training graph: forward + loss + backward (reverse-mode autodiff on the IR) + updates.

The backward graph is generated from each op's vector-Jacobian rule (kept beside the op in
`ops/`), walking the forward nodes in reverse. Contributions that reach the same value are
summed once, when the value's gradient is first needed. The loss gradient enters through the
scalar graph input `loss_seed` (1 for training; the runtime feeds 0 when the user supplies
d(logits) directly, so the weight-decay term drops out and `grad/<w>` is exactly the
vector-Jacobian product of the logits).

Public outputs added: `loss`, `xent`, `weight_decay`, `grad/<trainable>`, `grad/images`,
`grad/logits` (the seed point `backward(dlogits)` overrides), and `new/<variable>` for every
variable a step updates (trainables, moving statistics, optimizer slots).
"""

from __future__ import annotations

from .build import Model, Variable
from .ir import Graph, Node, verify
from . import ops

SEED = "loss_seed"
LEARNING_RATE = "learning_rate"


def training_graph(model: Model, spec) -> tuple[Graph, dict[str, Variable]]:
    """The full train graph and every variable it reads (model variables plus slots)."""
    graph = model.graph.copy()
    variables = dict(model.variables)
    loss = _add_loss(graph, model, spec)
    trainables = [n for n, v in model.variables.items() if v.role == "param"]
    grads = gradients(graph, loss, trainables + ["images"])
    for name, grad in grads.items():
        graph.outputs[f"grad/{name}"] = grad
    _add_updates(graph, variables, trainables, grads, spec)
    verify(graph)
    return graph, variables


def _add_loss(graph: Graph, model: Model, spec) -> str:
    logits = graph.outputs["logits"]
    labels = graph.add_input("labels", graph.value(logits).shape, "data")
    targets = labels
    if spec.train.label_smoothing:
        targets = graph.add_node("smooth_labels", [labels],
                                 {"epsilon": spec.train.label_smoothing,
                                  "classes": spec.model.num_classes},
                                 name="loss/smooth_labels", scope="loss", phase="loss")[0]
    xent = graph.add_node("softmax_cross_entropy", [logits, targets], name="loss/xent",
                          scope="loss", phase="loss")[0]
    decayed = decayed_variables(model.variables, spec.train.weight_decay_on)
    l2 = graph.add_node("l2_penalty", decayed, {"scale": spec.train.weight_decay},
                        name="loss/weight_decay", scope="loss", phase="loss")[0]
    loss = graph.add_node("add", [xent, l2], name="loss/total", scope="loss", phase="loss")[0]
    graph.outputs.update(loss=loss, xent=xent, weight_decay=l2)
    return loss


def decayed_variables(variables: dict[str, Variable], on: str) -> list[str]:
    """What `train.weight_decay_on` decays: "kernels", the seed's rule, every `DW`
    (convolutions and the logit layer); "all", every trainable, biases and batch-norm gamma
    and beta too."""
    if on == "all":
        return [n for n, v in variables.items() if v.role == "param"]
    return [n for n in variables if n.endswith("/DW")]


class _GradBuilder:
    """What a vjp rule sees: emit nodes into the backward phase, read shapes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.node: Node | None = None

    def shape(self, value: str) -> tuple:
        return self.graph.value(value).shape

    def emit(self, op: str, inputs, attrs, suffix: str, n_outputs: int = 1):
        name = f"grad/{self.node.name}/{suffix}"
        outs = self.graph.add_node(op, inputs, attrs, name=name, scope=self.node.scope,
                                   phase="backward")
        return outs if n_outputs > 1 else outs[0]


def gradients(graph: Graph, loss: str, wrt: list[str]) -> dict[str, str]:
    """Append the backward of `loss` to `graph`; return {value in wrt: gradient value}."""
    graph.add_input(SEED, (), "data")
    contributions: dict[str, list[str]] = {loss: [SEED]}
    builder = _GradBuilder(graph)
    relevant = _on_path(graph, set(wrt), loss)
    for node in reversed(list(graph.nodes)):
        if node.name not in relevant:
            continue
        douts = [_total(graph, contributions, out) for out in node.outputs]
        if douts[0] is None:
            continue
        builder.node = node
        dins = ops.get(node.op).vjp(builder, node, *douts)
        for value, grad in zip(node.inputs, dins):
            if grad is not None:
                contributions.setdefault(value, []).append(grad)
        if node.op == "softmax_cross_entropy":
            graph.outputs["grad/logits"] = dins[0]
    return {name: _total(graph, contributions, name) for name in wrt}


def _on_path(graph: Graph, sources: set[str], target: str) -> set[str]:
    """Names of nodes that depend on a source and lead to the target."""
    reached, forward = set(sources), set()
    for node in graph.nodes:
        if reached.intersection(node.inputs):
            reached.update(node.outputs)
            forward.add(node.name)
    needed, backward = {target}, set()
    for node in reversed(graph.nodes):
        if needed.intersection(node.outputs):
            needed.update(node.inputs)
            backward.add(node.name)
    return forward & backward


def _total(graph: Graph, contributions: dict[str, list[str]], value: str) -> str | None:
    """The gradient of `value`, summing its contributions into one value the first time."""
    parts = contributions.get(value)
    if not parts:
        return None
    total = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        total = graph.add_node("add", [total, part], name=f"grad/{value}/sum{i}",
                               scope=_scope_of(graph, value), phase="backward")[0]
    contributions[value] = [total]
    return total


def _scope_of(graph: Graph, value: str) -> str:
    producer = graph.producers().get(value)
    return producer.scope if producer else value.rsplit("/", 1)[0]


# -- updates ------------------------------------------------------------------------------
def _add_updates(graph: Graph, variables: dict[str, Variable], trainables, grads, spec) -> None:
    lr = graph.add_input(LEARNING_RATE, (), "hyper")
    for name in trainables:
        _optimizer_update(graph, variables, name, grads[name], lr, spec.train)
    for node in list(graph.nodes):
        if node.op == "batch_norm" and node.phase == "forward":
            for stat, batch_value in zip(("moving_mean", "moving_variance"), node.outputs[1:]):
                _moving_update(graph, variables, f"{node.scope}/{stat}", batch_value,
                               spec.batch_norm)


def _state(graph: Graph, variables, name: str, shape: tuple, init: str) -> str:
    variables.setdefault(name, Variable(name, shape, "state", init))
    if name not in graph.inputs:
        graph.add_input(name, shape, "state")
    return name


def _optimizer_update(graph: Graph, variables, name: str, grad: str, lr: str, train) -> None:
    shape = graph.value(name).shape
    if train.optimizer == "momentum":
        accum = _state(graph, variables, f"{name}/Momentum", shape, "zeros")
        op = "nesterov_update" if train.nesterov else "momentum_update"
        new_w, new_accum = graph.add_node(op, [name, accum, grad, lr],
                                          {"momentum": train.momentum}, name=f"update/{name}",
                                          scope=name.rsplit("/", 1)[0], phase="update")
        graph.outputs[f"new/{accum}"] = new_accum
    else:
        new_w = graph.add_node("sgd_update", [name, grad, lr], name=f"update/{name}",
                               scope=name.rsplit("/", 1)[0], phase="update")[0]
    graph.outputs[f"new/{name}"] = new_w


def _moving_update(graph: Graph, variables, name: str, batch_value: str, bn) -> None:
    scope = name.rsplit("/", 1)[0]
    shape = graph.value(name).shape
    if not bn.zero_debias:
        new = graph.add_node("moving_average", [name, batch_value], {"decay": bn.decay},
                             name=f"update/{name}", scope=scope, phase="update")[0]
        graph.outputs[f"new/{name}"] = new
        return
    biased = _state(graph, variables, f"{name}/biased", shape, "zeros")
    step = _state(graph, variables, f"{name}/local_step", (), "zeros")
    new_biased, new_step, new = graph.add_node(
        "debiased_moving_average", [biased, step, batch_value], {"decay": bn.decay},
        name=f"update/{name}", scope=scope, phase="update")
    graph.outputs.update({f"new/{name}": new, f"new/{biased}": new_biased,
                          f"new/{step}": new_step})
