"""Pooling: max_pool (ImageNet stem), avg_pool (the seed's pooled shortcut) and
global_avg_pool (the head), with gradients."""

import numpy as np

from ..padding import out_size, pads_2d, window_out
from .registry import define, numel, require


def _pool_shape(attrs, x):
    require(len(x) == 4, "input must be NHWC (rank 4)")
    k, s, p = attrs["k"], attrs["stride"], attrs["padding"]
    return [(x[0], out_size(x[1], k, s, p), out_size(x[2], k, s, p), x[3])]


def _windows(attrs, x):
    """The padded input (-inf border) and the k*k strided views of it, tap by tap."""
    k, s = attrs["k"], attrs["stride"]
    t, b, l, r = pads_2d(x.shape[1], x.shape[2], k, s, attrs["padding"])
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-np.inf)
    oh, ow = window_out(x.shape[1], k, s, t, b), window_out(x.shape[2], k, s, l, r)
    taps = [(slice(i, i + s * (oh - 1) + 1, s), slice(j, j + s * (ow - 1) + 1, s))
            for i in range(k) for j in range(k)]
    return xp, (t, l), taps


def _max_pool_ref(attrs, x):
    xp, _, taps = _windows(attrs, x)
    return (np.max([xp[:, r, c, :] for r, c in taps], axis=0),)


def _max_pool_grad_ref(attrs, dy, x):
    """Each window's gradient goes to its first maximum, as TensorFlow's MaxPoolGrad."""
    xp, (t, l), taps = _windows(attrs, x)
    stacked = np.stack([xp[:, r, c, :] for r, c in taps])
    first = np.argmax(stacked, axis=0)
    dxp = np.zeros(xp.shape, dtype=dy.dtype)
    for tap, (r, c) in enumerate(taps):
        dxp[:, r, c, :] += np.where(first == tap, dy, 0)
    return (dxp[:, t:t + x.shape[1], l:l + x.shape[2], :],)


def avg_pool_taps(k: int, oh: int, ow: int):
    """The (row, column) slices of each tap of every disjoint k x k block, in row-major tap
    order: tap (i, j) of block (r, c) is pixel (r * k + i, c * k + j)."""
    return [(slice(i, i + k * oh, k), slice(j, j + k * ow, k))
            for i in range(k) for j in range(k)]


def avg_pool_reference(k: int, x):
    """The mean of each disjoint k x k block: TensorFlow's avg_pool with ksize = strides = k
    and VALID padding (rows and columns that fill no block are dropped). The taps are summed
    in row-major order, then divided by k * k, as every backend does."""
    oh, ow = x.shape[1] // k, x.shape[2] // k
    taps = [x[:, r, c, :] for r, c in avg_pool_taps(k, oh, ow)]
    return sum(taps[1:], taps[0]) / x.dtype.type(k * k)


def _avg_pool_shape(attrs, x):
    require(len(x) == 4, "input must be NHWC (rank 4)")
    k = attrs["k"]
    require(k >= 1 and x[1] >= k and x[2] >= k, f"a {k}x{k} block does not fit {x[1]}x{x[2]}")
    return [(x[0], x[1] // k, x[2] // k, x[3])]


def _avg_pool_grad_ref(attrs, dy):
    """Each block's gradient, divided by k * k, to each of its pixels; zero for the pixels
    that fill no block."""
    k, (h, w) = attrs["k"], attrs["in_hw"]
    dx = np.zeros((dy.shape[0], h, w, dy.shape[3]), dtype=dy.dtype)
    share = dy / dy.dtype.type(k * k)
    for r, c in avg_pool_taps(k, dy.shape[1], dy.shape[2]):
        dx[:, r, c, :] = share
    return (dx,)


def _avg_pool_vjp(g, node, dy):
    shape = g.shape(node.inputs[0])
    return [g.emit("avg_pool_grad", [dy], {"k": node.attrs["k"], "in_hw": (shape[1], shape[2])},
                   "dx")]


def _gap_shape(attrs, x):
    require(len(x) == 4, "input must be NHWC (rank 4)")
    return [(x[0], x[3])]


def _gap_grad_ref(attrs, dy):
    h, w = attrs["in_hw"]
    scaled = dy / dy.dtype.type(h * w)
    return (np.broadcast_to(scaled[:, None, None, :], (dy.shape[0], h, w, dy.shape[1])).copy(),)


def _gap_vjp(g, node, dy):
    shape = g.shape(node.inputs[0])
    return [g.emit("global_avg_pool_grad", [dy], {"in_hw": (shape[1], shape[2])}, "dx")]


define("max_pool", kind="window", shape=_pool_shape, reference=_max_pool_ref,
       vjp=lambda g, node, dy: [g.emit("max_pool_grad", [dy, node.inputs[0]], node.attrs, "dx")])
define("max_pool_grad", kind="window", shape=lambda a, dy, x: [x], reference=_max_pool_grad_ref)
define("global_avg_pool", kind="window", shape=_gap_shape,
       reference=lambda a, x: (x.mean(axis=(1, 2)),), vjp=_gap_vjp)
define("global_avg_pool_grad", kind="window",
       shape=lambda a, dy: [(dy[0], a["in_hw"][0], a["in_hw"][1], dy[1])],
       reference=_gap_grad_ref)
define("avg_pool", kind="window", shape=_avg_pool_shape,
       reference=lambda a, x: (avg_pool_reference(a["k"], x),), vjp=_avg_pool_vjp,
       flops=lambda a, ins, outs: numel(outs[0]) * a["k"] ** 2)
define("avg_pool_grad", kind="window",
       shape=lambda a, dy: [(dy[0], a["in_hw"][0], a["in_hw"][1], dy[3])],
       reference=_avg_pool_grad_ref, flops=lambda a, ins, outs: numel(outs[0]))
