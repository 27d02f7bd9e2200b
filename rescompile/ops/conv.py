"""conv2d (NHWC input, HWIO kernel, no bias) and its two gradients."""

import numpy as np

from ..padding import pads_2d, out_size
from .registry import define, per_image, require


def _out_hw(attrs, h, w, k):
    s, p = attrs["stride"], attrs["padding"]
    return out_size(h, k, s, p), out_size(w, k, s, p)


def conv_shape(attrs, x, w):
    require(len(x) == 4, "input must be NHWC (rank 4)")
    require(len(w) == 4 and w[0] == w[1], "kernel must be HWIO [k, k, in, out]")
    require(x[3] == w[2], f"input has {x[3]} channels, kernel expects {w[2]}")
    require(attrs["stride"] >= 1, "stride must be >= 1")
    oh, ow = _out_hw(attrs, x[1], x[2], w[0])
    require(oh >= 1 and ow >= 1, "output would be empty")
    return [(x[0], oh, ow, w[3])]


def _taps(attrs, h, w, k, oh, ow):
    """Yield (i, j, row slice, col slice) of the padded input that kernel tap (i, j) reads."""
    s = attrs["stride"]
    for i in range(k):
        for j in range(k):
            yield i, j, slice(i, i + s * (oh - 1) + 1, s), slice(j, j + s * (ow - 1) + 1, s)


def _padded(attrs, x, k):
    t, b, l, r = pads_2d(x.shape[1], x.shape[2], k, attrs["stride"], attrs["padding"])
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0))), (t, l)


def conv_reference(attrs, x, w):
    k = w.shape[0]
    xp, _ = _padded(attrs, x, k)
    oh, ow = _out_hw(attrs, x.shape[1], x.shape[2], k)
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]), dtype=x.dtype)
    for i, j, rows, cols in _taps(attrs, x.shape[1], x.shape[2], k, oh, ow):
        y += xp[:, rows, cols, :] @ w[i, j]
    return (y,)


def _grad_input_shape(attrs, dy, w):
    h, wd = attrs["in_hw"]
    return [(dy[0], h, wd, w[2])]


def _grad_input_ref(attrs, dy, w):
    k = w.shape[0]
    h, wd = attrs["in_hw"]
    t, b, l, r = pads_2d(h, wd, k, attrs["stride"], attrs["padding"])
    dxp = np.zeros((dy.shape[0], h + t + b, wd + l + r, w.shape[2]), dtype=dy.dtype)
    for i, j, rows, cols in _taps(attrs, h, wd, k, dy.shape[1], dy.shape[2]):
        dxp[:, rows, cols, :] += dy @ w[i, j].T
    return (dxp[:, t:t + h, l:l + wd, :],)


def _grad_filter_shape(attrs, x, dy):
    k = attrs["k"]
    return [(k, k, x[3], dy[3])]


def _grad_filter_ref(attrs, x, dy):
    k = attrs["k"]
    xp, _ = _padded(attrs, x, k)
    dw = np.zeros((k, k, x.shape[3], dy.shape[3]), dtype=x.dtype)
    flat_dy = dy.reshape(-1, dy.shape[3])
    for i, j, rows, cols in _taps(attrs, x.shape[1], x.shape[2], k, dy.shape[1], dy.shape[2]):
        dw[i, j] = xp[:, rows, cols, :].reshape(-1, x.shape[3]).T @ flat_dy
    return (dw,)


def _conv_vjp(g, node, dy):
    x, w = node.inputs
    xs, ws = g.shape(x), g.shape(w)
    dx = g.emit("conv2d_grad_input", [dy, w], dict(node.attrs, in_hw=(xs[1], xs[2])), "dx")
    dw = g.emit("conv2d_grad_filter", [x, dy], dict(node.attrs, k=ws[0]), "dw")
    return [dx, dw]


def conv_flops(out_shape, k, cin):
    """2 * multiply-adds of a k x k convolution producing out_shape."""
    n, oh, ow, cout = per_image(out_shape)
    return 2.0 * n * oh * ow * cout * k * k * cin


define("conv2d", kind="conv", inputs=("x", "w"), shape=conv_shape, reference=conv_reference,
       vjp=_conv_vjp,
       flops=lambda a, ins, outs: conv_flops(outs[0], ins[1][0], ins[1][2]))
define("conv2d_grad_input", kind="conv_grad_input", inputs=("dy", "w"), shape=_grad_input_shape,
       reference=_grad_input_ref,
       flops=lambda a, ins, outs: conv_flops(ins[0], ins[1][0], ins[1][2]))
define("conv2d_grad_filter", kind="conv_grad_filter", shape=_grad_filter_shape,
       reference=_grad_filter_ref,
       flops=lambda a, ins, outs: conv_flops(ins[1], a["k"], ins[0][3]))
