"""max_pool and its gradient (ops/pool.py) as elementwise loops over windows, and the seed's
shortcut: avg_pool and pad_channels (ops/channels.py) as one pooled read, which the
epilogues of add_pooled read too, and their gradients as one spread.

The gradients are written as gathers (each input pixel visits the windows that contain it; for
max_pool it takes dy from those whose *first* maximum it is, as TensorFlow's MaxPoolGrad) so
no two threads write one address: no atomics, deterministic.
"""

from __future__ import annotations

from ...ops.fused import pool_pad_params
from ...padding import pads_2d
from .elementwise import Operand, loop_launch
from .launch import Context, Launch, value
from .pooled import pooled_read
from .source import indent


def _geometry(ctx, node, x):
    _, h, w, c = ctx.shape(x)
    k, s = node.attrs["k"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, w, k, s, node.attrs["padding"])
    return h, w, c, k, s, top, left


def _window_max(h, w, c, k, s, top, left, dt) -> list[str]:
    """best, bi, bj: the first maximum of window (oh, ow) of image b, channel ch (in0 = x)."""
    return [f"best = {dt}(-np.inf)", "bi = -1", "bj = -1",
            f"for ti in range({k}):", f"    ih = oh * {s} + ti - {top}",
            f"    for tj in range({k}):", f"        iw = ow * {s} + tj - {left}",
            f"        if ih >= 0 and ih < {h} and iw >= 0 and iw < {w}:",
            f"            v = in0[((b * {h} + ih) * {w} + iw) * {c} + ch]",
            "            if v > best:", "                best = v", "                bi = ih",
            "                bj = iw"]


def lower_max_pool(ctx: Context, node) -> list[Launch]:
    (x,) = node.inputs
    h, w, c, k, s, top, left = _geometry(ctx, node, x)
    _, oh, ow, _ = ctx.shape(node.outputs[0])
    dt = f"np.{ctx.dtype}"
    prelude = [f"ch = i % {c}", f"ow = (i // {c}) % {ow}", f"oh = (i // {c * ow}) % {oh}",
               f"b = i // {c * ow * oh}"] + _window_max(h, w, c, k, s, top, left, dt)
    size = ctx.size(node.outputs[0])
    return [loop_launch(ctx, node.name, size, [Operand(value(x), None, ctx.size(x))],
                        [Operand(value(node.outputs[0]), "i", size)],
                        lambda e, loads: ["best"], f"{node.op} {node.name}", prelude)]


def lower_max_pool_grad(ctx: Context, node) -> list[Launch]:
    dy, x = node.inputs
    h, w, c, k, s, top, left = _geometry(ctx, node, x)
    _, oh_n, ow_n, _ = ctx.shape(dy)
    dt = f"np.{ctx.dtype}"
    window = _window_max(h, w, c, k, s, top, left, dt)
    prelude = [f"ch = i % {c}", f"pw = (i // {c}) % {w}", f"ph = (i // {c * w}) % {h}",
               f"b = i // {c * w * h}", f"total = {dt}(0)",
               # windows whose rows cover ph: oh * s - top <= ph < oh * s - top + k
               f"for oh in range(max(0, (ph + {top} - {k} + {s}) // {s}), "
               f"min({oh_n}, (ph + {top}) // {s} + 1)):",
               f"    for ow in range(max(0, (pw + {left} - {k} + {s}) // {s}), "
               f"min({ow_n}, (pw + {left}) // {s} + 1)):"]
    prelude += indent(window + ["if bi == ph and bj == pw:",
                                f"    total += in1[((b * {oh_n} + oh) * {ow_n} + ow) * {c} + ch]"],
                      2)
    size = ctx.size(x)
    ins = [Operand(value(x), None, size), Operand(value(dy), None, ctx.size(dy))]
    return [loop_launch(ctx, node.name, size, ins, [Operand(value(node.outputs[0]), "i", size)],
                        lambda e, loads: ["total"], f"{node.op} {node.name}", prelude)]


def lower_pool_pad(ctx: Context, node) -> list[Launch]:
    """avg_pool (before = 0) or pad_channels (k = 1): the pooled read of the input."""
    (x,), (out,) = node.inputs, node.outputs
    size = ctx.size(out)
    prelude = pooled_read("in0", ctx.shape(out), ctx.shape(x), *pool_pad_params(node.attrs),
                          "i", f"np.{ctx.dtype}", "pooled")
    return [loop_launch(ctx, node.name, size, [Operand(value(x), None, ctx.size(x))],
                        [Operand(value(out), "i", size)], lambda e, loads: ["pooled"],
                        f"{node.op} {node.name}", prelude)]


def lower_spread(ctx: Context, node) -> list[Launch]:
    """avg_pool_grad (before = 0), crop_channels (k = 1) or both (pool_pad_grad): each pixel
    of a k x k block takes its block's dy from channel `before` on, divided by k * k; zero
    outside every block."""
    (dy,), (out,) = node.inputs, node.outputs
    (_, h, w, c), (_, oh, ow, cd) = ctx.shape(out), ctx.shape(dy)
    (k, before), dt = pool_pad_params(node.attrs), f"np.{ctx.dtype}"
    prelude = [f"p = i // {c}", f"bh = (p // {w}) % {h} // {k}", f"bw = p % {w} // {k}",
               f"share = {dt}(0)", f"if bh < {oh} and bw < {ow}:",
               f"    share = in0[((p // {h * w} * {oh} + bh) * {ow} + bw) * {cd} + i % {c} + "
               f"{before}] / {dt}({k * k})"]
    size = ctx.size(out)
    return [loop_launch(ctx, node.name, size, [Operand(value(dy), None, ctx.size(dy))],
                        [Operand(value(out), "i", size)], lambda e, loads: ["share"],
                        f"{node.op} {node.name}", prelude)]
