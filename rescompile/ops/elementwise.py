"""Elementwise ops: leaky relu (TensorFlow's convention), its gradient, and add."""

import numpy as np

from .registry import define, require


def leaky_relu(x, alpha):
    """x where x >= 0, alpha * x where x < 0 (so the slope at exactly 0 is 1)."""
    return np.where(x < 0, x * x.dtype.type(alpha), x)


def leaky_relu_grad(dy, x, alpha):
    return np.where(x < 0, dy * dy.dtype.type(alpha), dy)


def _same_shape(attrs, a, b):
    require(tuple(a) == tuple(b), f"operands differ in shape: {list(a)} vs {list(b)}")
    return [a]


define("relu", kind="epilogue", shape=lambda a, x: [x],
       reference=lambda a, x: (leaky_relu(x, a["alpha"]),),
       vjp=lambda g, node, dy: [g.emit("relu_grad", [dy, node.inputs[0]], node.attrs, "dx")])
define("relu_grad", kind="epilogue", shape=_same_shape,
       reference=lambda a, dy, x: (leaky_relu_grad(dy, x, a["alpha"]),))
define("add", kind="epilogue", shape=_same_shape, reference=lambda a, x, y: (x + y,),
       vjp=lambda g, node, dy: [dy, dy])
