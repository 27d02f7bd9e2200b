"""Kernels that are not GEMMs: the epilogue vocabulary on a tensor (elementwise chains, and a
plain copy into the interior of a zero-bordered buffer), max pooling, the global mean, and the
seed's shortcut where no add reads it (its average pool and channel padding, and their
gradients).
Each walks output pixels and vectors of channels (`pixels.py`); all are memory-bound, so they
are written for clarity, not registers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from llvmlite import ir

from ..target import Target
from . import abi, epilogue
from .emit import Function, Vectors, new_module
from .pixels import (PixelWalk, channel_table, channel_vectors, fence_streams, load_vector,
                     offset, pooled_vector, put_vector, store_vector, streaming)


# A pooling window's geometry, then the input's and the output's sizes.
WINDOW = ("k", "stride", "pad_top", "pad_left", "h", "w", "oh", "ow")


@dataclass(frozen=True)
class PixelKernel(Vectors):
    """A kernel over pixels, one vector of channels at a time; its symbol is `kind`'s (what
    it computes) for its dtype and instruction set. Its signature is its `sizes`, then the
    strided tensors it `reads` and `writes` (or a subclass's own); it emits
    `body(f, fields, pointers)`."""
    dtype: str
    target: Target
    storage: tuple[tuple[str, str], ...] = field(default=(), kw_only=True)
    kind: ClassVar[str] = ""
    sizes: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    @property
    def symbol(self) -> str:
        return f"{self.kind}_{self.dtype}_{self.target.isa}{self.storage_tag()}"

    @property
    def signature(self) -> abi.Signature:
        return (abi.sizes(*self.sizes) + abi.strides(*self.reads, *self.writes)
                + abi.stored(self, *self.reads) + abi.stored(self, *self.writes, written=True))

    def ir(self) -> str:
        module = new_module(self.symbol)
        f = abi.new_function(module, self.symbol, self.dtype, self.lanes, self.target)
        f.b.comment(f"{self.symbol}: fields {', '.join(x.name for x in self.signature.fields)}")
        v, ptr = abi.load_arguments(f, self.signature)
        self.body(f, v, ptr)
        if "streaming" in v:  # a kernel whose outputs may pass the caches
            fence_streams(f, streaming(f, v))
        f.finish()
        return str(module)


@dataclass(frozen=True)
class EltwiseKernel(epilogue.Chained, PixelKernel):
    """out = epilogue(x) per element, and out2 = out2(out); no steps is a copy."""
    epilogue: tuple[str, ...] = ()
    out2: tuple[str, ...] | None = None

    @property
    def symbol(self) -> str:
        return (f"eltwise_{self.dtype}_{self.target.isa}_{self.chain_name('copy')}"
                f"{self.storage_tag()}")

    @property
    def signature(self) -> abi.Signature:
        signature = (abi.sizes("oh", "ow") + abi.placed("streaming")
                     + abi.strides("x", *self.outputs)
                     + abi.stored(self, "x") + abi.stored(self, *self.outputs, written=True))
        for chain in self.chains:
            signature += chain.signature(self)
        return signature

    def body(self, f: Function, v, ptr) -> None:
        b, streams = f.b, streaming(f, v)

        def derive(c, mask):  # once a call: what the chains' steps make of their operands
            derived = {}
            for chain in self.chains:
                derived.update(chain.derive(f, lambda o: epilogue.read_operand(
                    f, o, v, ptr, None, c, mask), v))
            return derived

        def pixels(c0, c1, derived):
            walk = PixelWalk(f, v["oh"], v["ow"])
            with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
                at = walk.position()

                def element(tensor, c):
                    return f.element(ptr[tensor], b.add(offset(f, v, tensor, *at), c))

                def vector(c, mask):
                    def operand(o: epilogue.Operand):
                        return epilogue.read_operand(f, o, v, ptr, at, c, mask)

                    value, made = load_vector(f, element("x", c), mask, name="x"), derived(c)
                    for chain, out in zip(self.chains, self.outputs):
                        value = f.stored_form(epilogue.apply_chain(
                            f, chain, value, operand, v, derived=made), ptr[out])
                        put_vector(f, value, element(out, c), mask, streams)
                        value = f.read_back(value, ptr[out])  # what out2 is made of
                channel_vectors(f, vector, c0, c1)
                walk.advance()

        names = tuple(n for chain in self.chains for n in chain.derived_names)
        channel_table(f, names, derive, pixels)


@dataclass(frozen=True)
class PoolPadKernel(PixelKernel):
    """out = x average-pooled over k x k blocks, then zero-padded by `before` channels (and
    whatever is left after them): avg_pool with before = 0, pad_channels with k = 1. The
    arithmetic is the pooled epilogue operand's (`pixels.pooled_vector`)."""

    kind = "poolpad"
    sizes, reads, writes = ("oh", "ow", "k", "before", "channels"), ("x",), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        walk = PixelWalk(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            at = walk.position()

            def vector(c, mask):
                value = pooled_vector(f, v, "x", ptr["x"], v["k"], v["before"], v["channels"],
                                      at, c, mask, name="pooled")
                out = f.b.add(offset(f, v, "out", *at), c)
                store_vector(f, value, f.element(ptr["out"], out), mask)
            channel_vectors(f, vector)
            walk.advance()


@dataclass(frozen=True)
class SpreadKernel(PixelKernel):
    """The gradient of PoolPadKernel's output: out[n, h, w, c] = dy[n, h / k, w / k,
    c + before] / (k * k), zero for the rows and columns past the last whole block
    (`rows` x `cols` blocks): avg_pool_grad with before = 0, crop_channels with k = 1, and
    pool_pad_grad, both at once."""

    kind = "spread"
    sizes, reads, writes = ("oh", "ow", "k", "before", "rows", "cols"), ("dy",), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        walk = PixelWalk(f, v["oh"], v["ow"])
        count = f.splat(b.uitofp(b.mul(v["k"], v["k"]), f.scalar), name="count")
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            n, h, w = walk.position()
            block_h, block_w = b.udiv(h, v["k"], name="block_h"), b.udiv(w, v["k"], name="block_w")
            inside = b.and_(b.icmp_signed("<", block_h, v["rows"]),
                            b.icmp_signed("<", block_w, v["cols"]), name="in_a_block")

            def vector(c, mask):
                lanes = f.splat_flag(inside)
                lanes = lanes if mask is None else b.and_(lanes, mask)
                source = b.add(offset(f, v, "dy", n, block_h, block_w), b.add(c, v["before"]))
                dy = f.masked_load(f.element(ptr["dy"], source), lanes, name="dy")
                out = f.element(ptr["out"], b.add(offset(f, v, "out", n, h, w), c))
                store_vector(f, b.fdiv(dy, count, name="share"), out, mask)
            channel_vectors(f, vector)
            walk.advance()


@dataclass(frozen=True)
class MaxPoolKernel(PixelKernel):
    """out[n, oh, ow, c] = the max over the window's taps inside the input (the reference's
    -inf border never wins; NaN propagates, as np.max does)."""

    kind = "maxpool"
    sizes, reads, writes = WINDOW, ("x",), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        walk = PixelWalk(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            n, oh, ow = walk.position()

            def vector(c, mask):
                best = f.slot(f.vector, "best", f.vconst(float("-inf")))
                with window_taps(f, v, ptr, n, oh, ow, c, mask) as (_, _, tap):
                    f.set(best, f.binary("maximum", f.get(best), tap))
                out = b.add(offset(f, v, "out", n, oh, ow), c)
                store_vector(f, f.get(best), f.element(ptr["out"], out), mask)
            channel_vectors(f, vector)
            walk.advance()


@dataclass(frozen=True)
class MeanKernel(PixelKernel):
    """out[n, c] = the mean of x[n, :, :, c]: a call's pixels are images."""

    kind = "mean"
    sizes, reads, writes = ("h", "w"), ("x",), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        count = _pixels(f, v["h"], v["w"])
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "n") as n:
            def vector(c, mask):
                total = f.slot(f.vector, "total", f.vconst(0.0))
                with f.loop(0, v["h"], 1, "i") as i:
                    with f.loop(0, v["w"], 1, "j") as j:
                        at = b.add(offset(f, v, "x", n, i, j), c)
                        f.set(total, b.fadd(f.get(total),
                                            load_vector(f, f.element(ptr["x"], at), mask)))
                out = b.add(b.mul(n, v["out.image"]), c)
                store_vector(f, b.fdiv(f.get(total), count), f.element(ptr["out"], out), mask)
            channel_vectors(f, vector)


@dataclass(frozen=True)
class MeanGradKernel(PixelKernel):
    """out[n, h, w, c] = dy[n, c] / (H * W): the gradient of the global mean."""

    kind = "meangrad"
    sizes, reads, writes = ("oh", "ow"), ("dy",), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        walk = PixelWalk(f, v["oh"], v["ow"])
        count = _pixels(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            n, oh, ow = walk.position()

            def vector(c, mask):
                at = f.b.add(f.b.mul(n, v["dy.image"], name="dy.image_off"), c)
                dy = load_vector(f, f.element(ptr["dy"], at), mask, name="dy")
                out = f.element(ptr["out"], f.b.add(offset(f, v, "out", n, oh, ow), c))
                store_vector(f, f.b.fdiv(dy, count, name="share"), out, mask)
            channel_vectors(f, vector)
            walk.advance()


@dataclass(frozen=True)
class MaxPoolGradKernel(PixelKernel):
    """dx of max_pool: each window's gradient goes to its first maximum (TensorFlow's
    MaxPoolGrad; NaN counts as the maximum, as np.argmax has it). Computed per input pixel by
    gathering from the windows that contain it, so calls never write the same element."""

    kind = "maxpoolgrad"
    sizes, reads, writes = WINDOW, ("dy", "x"), ("out",)

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        walk = PixelWalk(f, v["h"], v["w"])
        s, k = v["stride"], v["k"]

        def windows(at, pad, size):
            """[first, end) of the windows along one axis that contain input position at."""
            reach = b.add(at, pad)
            high = b.sdiv(reach, s)
            low_num = b.sub(reach, b.sub(k, f.i64(1)))
            low = b.sdiv(b.add(low_num, b.sub(s, f.i64(1))), s)  # ceil for low_num >= 0
            low = b.select(b.icmp_signed("<", low_num, f.i64(0)), f.i64(0), low)
            end = b.add(high, f.i64(1))
            return low, b.select(b.icmp_signed("<", end, size), end, size)

        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            n, ih, iw = walk.position()
            oh0, oh1 = windows(ih, v["pad_top"], v["oh"])
            ow0, ow1 = windows(iw, v["pad_left"], v["ow"])

            def vector(c, mask):
                total = f.slot(f.vector, "total", f.vconst(0.0))
                with f.loop(oh0, oh1, 1, "oh") as oh:
                    with f.loop(ow0, ow1, 1, "ow") as ow:
                        winner = self.first_maximum(f, v, ptr, n, oh, ow, ih, iw, c, mask)
                        dy = load_vector(f, f.element(ptr["dy"], b.add(
                            offset(f, v, "dy", n, oh, ow), c)), mask)
                        f.set(total, b.fadd(f.get(total), b.select(winner, dy,
                                                                   f.vconst(0.0))))
                out = f.element(ptr["out"], b.add(offset(f, v, "out", n, ih, iw), c))
                store_vector(f, f.get(total), out, mask)
            channel_vectors(f, vector)
            walk.advance()

    def first_maximum(self, f, v, ptr, n, oh, ow, ih, iw, c, mask):
        """Lanes where input (ih, iw) is the first maximum of window (oh, ow)."""
        b = f.b
        lanes = ir.VectorType(ir.IntType(1), f.lanes)
        best = f.slot(f.vector, "best", f.vconst(float("-inf")))
        mine = f.slot(lanes, "mine", ir.Constant(lanes, [0] * f.lanes))
        seen = f.slot(ir.IntType(1), "seen", ir.Constant(ir.IntType(1), 0))
        with window_taps(f, v, ptr, n, oh, ow, c, mask) as (row, col, tap):
            current = f.get(best)
            # the first tap, then strictly greater, or the first NaN over a number
            better = b.or_(b.fcmp_ordered(">", tap, current),
                           b.and_(b.fcmp_unordered("uno", tap, tap),
                                  b.fcmp_ordered("ord", current, current)))
            better = b.or_(better, f.splat_flag(b.not_(f.get(seen))))
            f.set(seen, ir.Constant(ir.IntType(1), 1))
            here = b.and_(b.icmp_signed("==", row, ih), b.icmp_signed("==", col, iw))
            f.set(best, b.select(better, tap, current))
            f.set(mine, b.select(better, f.splat_flag(here), f.get(mine)))
        return f.get(mine)


@contextmanager
def window_taps(f: Function, v, ptr, n, oh, ow, c, mask):
    """Emits the block inside once, in loops over the taps of window (oh, ow) that lie inside
    the input (the padding is skipped, not read); it sees each tap's (row, col, x vector)."""
    b = f.b
    top = b.sub(b.mul(oh, v["stride"]), v["pad_top"], name="window_top")
    left = b.sub(b.mul(ow, v["stride"]), v["pad_left"], name="window_left")
    with f.loop(0, v["k"], 1, "i") as i:
        row = b.add(top, i)
        with b.if_then(_inside(f, row, v["h"])):
            with f.loop(0, v["k"], 1, "j") as j:
                col = b.add(left, j)
                with b.if_then(_inside(f, col, v["w"])):
                    at = b.add(offset(f, v, "x", n, row, col), c)
                    yield row, col, load_vector(f, f.element(ptr["x"], at), mask)


def _inside(f: Function, at, size):
    return f.b.and_(f.b.icmp_signed(">=", at, f.i64(0)), f.b.icmp_signed("<", at, size))


def _pixels(f: Function, height, width):
    """The pixels of an image, height * width, as a vector of floats (the mean's divisor)."""
    return f.splat(f.b.uitofp(f.b.mul(height, width), f.scalar))
