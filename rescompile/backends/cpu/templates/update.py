"""Optimizer and moving-statistics kernels, flat over each variable, and the momentum update of
every parameter as one kernel (an `UpdateGroup` step): it takes tuples of flat views, so one
call walks all weights, slots and gradients in place of hundreds of small calls."""

from dataclasses import dataclass

import numpy as np

from ....ir import Node
from ..source import Call, Kernel, Lowering, literal, module, params_for

UPDATE_GROUP_OP = "momentum_update_group"


def _flat(prefix, n_in, n_out, body, doc):
    name, source = module(prefix, params_for(n_in, n_out), body, False, doc)
    return Kernel(name, source, ("flat",) * (n_in + n_out))


def momentum_update(node, graph, dtype):
    m = literal(node.attrs["momentum"], dtype)
    body = ["lr = a3[0]", "for i in range(a0.shape[0]):", f"    acc = a1[i] * {m} + a2[i]",
            "    o1[i] = acc", "    o0[i] = a0[i] - lr * acc"]
    return _flat("momentum", 4, 2, body, "momentum: accum = m * accum + g; w -= lr * accum")


def sgd_update(node, graph, dtype):
    body = ["lr = a2[0]", "for i in range(a0.shape[0]):", "    o0[i] = a0[i] - lr * a1[i]"]
    return _flat("sgd", 3, 1, body, "sgd: w -= lr * g")


def _rate(decay, dtype):
    """TensorFlow's float32-rounded 1 - decay (see ops/update.py)."""
    return literal(float(np.float32(1.0 - decay)), dtype)


def moving_average(node, graph, dtype):
    rate = _rate(node.attrs["decay"], dtype)
    body = ["for i in range(a0.shape[0]):", f"    o0[i] = a0[i] - (a0[i] - a1[i]) * {rate}"]
    return _flat("movavg", 2, 1, body, "moving average")


def debiased_moving_average(node, graph, dtype):
    rate = _rate(node.attrs["decay"], dtype)
    one = literal(1.0, dtype)
    body = ["o1[0] = a1[0] + " + one,
            f"factor = {one} - ({one} - {rate}) ** o1[0]",
            "for i in range(a0.shape[0]):", f"    o0[i] = a0[i] - (a0[i] - a2[i]) * {rate}",
            "    o2[i] = o0[i] / factor"]
    return _flat("debiased", 3, 3, body, "zero-debiased moving average")


TEMPLATES = {"momentum_update": momentum_update, "sgd_update": sgd_update,
             "moving_average": moving_average, "debiased_moving_average": debiased_moving_average}


@dataclass(frozen=True)
class UpdateGroup:
    """Every momentum_update of a schedule (same momentum, same learning rate)."""
    members: tuple[Node, ...]

    @property
    def node(self) -> Node:
        inputs = []
        for m in self.members:
            inputs += [i for i in m.inputs if i not in inputs]
        return Node(name=f"update/momentum[{len(self.members)}]", op=UPDATE_GROUP_OP,
                    inputs=tuple(inputs), outputs=tuple(o for m in self.members
                                                        for o in m.outputs),
                    scope="update", phase="update")

    def lower(self, graph, dtype: str) -> Lowering:
        m = literal(self.members[0].attrs["momentum"], dtype)
        body = ["rate = lr[0]", "for k in range(len(ws)):",
                "    w, a, g, nw, na = ws[k], accs[k], gs[k], new_ws[k], new_accs[k]",
                "    for i in range(w.shape[0]):", f"        acc = a[i] * {m} + g[i]",
                "        na[i] = acc", "        nw[i] = w[i] - rate * acc"]
        name, source = module("momentumall", ["ws", "accs", "gs", "lr", "new_ws", "new_accs"],
                              body, False, "momentum over every parameter")
        column = lambda k: tuple(m.inputs[k] for m in self.members)  # noqa: E731
        outputs = lambda k: tuple(m.outputs[k] for m in self.members)  # noqa: E731
        args = (column(0), column(1), column(2), self.members[0].inputs[3], outputs(0),
                outputs(1))
        views = ("pack", "pack", "pack", "flat", "pack", "pack")
        return Lowering((Call(Kernel(name, source, views), args),), {})


def find_update_group(steps) -> UpdateGroup | None:
    """The momentum updates of a schedule as one group, when they share momentum and rate."""
    members = tuple(n for n in steps if n.op == "momentum_update")
    if len(members) < 2 or len({(n.attrs["momentum"], n.inputs[3]) for n in members}) > 1:
        return None
    return UpdateGroup(members)
