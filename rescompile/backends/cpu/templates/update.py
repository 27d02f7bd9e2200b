"""Optimizer and moving-statistics kernels, flat over each variable."""

import numpy as np

from ..source import Kernel, literal, module, params_for


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
