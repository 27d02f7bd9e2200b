"""What every kernel that walks output pixels shares: the (image, row, column) of a flat pixel
index, and strided tensors.

A call covers pixels [p_begin, p_end) of a grid of `oh` x `ow` pixels per image, counted over
every image of the call, and channels [c_begin, c_end) (`abi.CALL_PARAMS`). A tensor is a base
pointer and three strides in elements (image, row, pixel: `abi.strides`), so the same kernel
reads and writes compact tensors, the interiors of zero-bordered buffers and per-thread scratch
alike.
"""

from __future__ import annotations

from llvmlite import ir

from .emit import I1, I64, Function


def offset(f: Function, v: dict, tensor: str, n, oh, ow, name: str = ""):
    """Element offset of pixel (n, oh, ow) in `tensor`."""
    b = f.b
    image = b.mul(n, v[f"{tensor}.image"], name=f"{tensor}.image_off")
    row = b.mul(oh, v[f"{tensor}.row"], name=f"{tensor}.row_off")
    column = b.mul(ow, v[f"{tensor}.pixel"], name=f"{tensor}.pixel_off")
    return b.add(b.add(image, row, name=f"{tensor}.row_start"), column,
                 name=name or f"{tensor}.at")


def next_pixel(f: Function, grid_h, grid_w, n, oh, ow, step=None):
    """(n, oh, ow) of the pixel after (n, oh, ow) in row-major order; unmoved if the i1 `step`
    is clear."""
    b = f.b
    ow = b.add(ow, f.i64(1) if step is None else b.zext(step, I64, name="moves"), name="ow_next")
    row_done = b.icmp_signed("==", ow, grid_w, name="row_done")
    ow = b.select(row_done, f.i64(0), ow, name="ow")
    oh = b.add(oh, b.zext(row_done, I64, name="rows_done"), name="oh_next")
    image_done = b.icmp_signed("==", oh, grid_h, name="image_done")
    oh = b.select(image_done, f.i64(0), oh, name="oh")
    return b.add(n, b.zext(image_done, I64, name="images_done"), name="n"), oh, ow


class PixelWalk:
    """Slots holding (n, oh, ow) of the current pixel, starting at p_begin."""

    def __init__(self, f: Function, grid_h, grid_w):
        self.f, self.grid_h, self.grid_w = f, grid_h, grid_w
        self.slots = [f.slot(I64, name) for name in ("at_n", "at_oh", "at_ow")]
        self.restart()

    def restart(self) -> None:
        """Back to p_begin."""
        b = self.f.b
        per_image = b.mul(self.grid_h, self.grid_w, name="pixels_per_image")
        rest = b.urem(self.f.args["p_begin"], per_image, name="first_in_image")
        self.move_to(b.udiv(self.f.args["p_begin"], per_image, name="first_n"),
                     b.udiv(rest, self.grid_w, name="first_oh"),
                     b.urem(rest, self.grid_w, name="first_ow"))

    def position(self):
        return [self.f.get(s) for s in self.slots]

    def move_to(self, n, oh, ow) -> None:
        for slot, value in zip(self.slots, (n, oh, ow)):
            self.f.set(slot, value)

    def advance(self) -> None:
        self.move_to(*next_pixel(self.f, self.grid_h, self.grid_w, *self.position()))


def channel_vectors(f: Function, body, start=None, stop=None) -> None:
    """Call body(c, mask) for each vector of channels in [start, stop) (by default the call's
    [c_begin, c_end)): mask is None for a whole vector, else the lanes below stop (the last,
    partial vector)."""
    b = f.b
    start = f.args["c_begin"] if start is None else start
    stop = f.args["c_end"] if stop is None else stop
    with f.loop(start, stop, f.lanes, "c") as c:
        width = b.sub(stop, c, name="width")
        with b.if_else(b.icmp_signed(">=", width, f.i64(f.lanes))) as (whole, partial):
            with whole:
                body(c, None)
            with partial:
                body(c, f.mask(0, width))


# Bytes of the per-channel vectors a kernel derives once a call (`channel_table`): half of
# every target's L1d, so the table stays there beside the pixels it is applied to.
TABLE_BYTES = 16 * 1024


class ChannelTable:
    """Named per-channel vectors of the compute type at `base` (on an element: moved
    unaligned), a vector of channels after another from channel `first`: `fill` them once,
    `read` them back at any channel."""

    def __init__(self, f: Function, names: tuple[str, ...], base, first):
        self.f, self.names, self.first = f, names, first
        self.base = f.b.bitcast(base, f.vector.as_pointer(), name="table")

    def entry(self, c, name: str):
        b, f = self.f.b, self.f
        vector = b.udiv(b.sub(c, self.first), f.i64(f.lanes))
        at = b.add(b.mul(vector, f.i64(len(self.names))), f.i64(self.names.index(name)))
        return b.gep(self.base, [at], name=f"table.{name}")

    def fill(self, derive, stop) -> None:
        """derive(c, mask) (a vector by name) at every vector of channels [first, stop)."""
        def store(c, mask):
            values = derive(c, mask)
            for name in self.names:
                self.f.b.store(values[name], self.entry(c, name), align=self.f.scalar_bytes)
        channel_vectors(self.f, store, self.first, stop)

    def read(self, c) -> dict:
        return {name: self.f.b.load(self.entry(c, name), name=name, align=self.f.scalar_bytes)
                for name in self.names}


def channel_table(f: Function, names: tuple[str, ...], derive, body) -> None:
    """Per-channel vectors derived once a call, not once a pixel (a batch norm's 1 / sqrt(var
    + eps) and its like, which a pixel loop over channel vectors would compute again at every
    pixel): for each block of the call's channels whose `names` vectors fit TABLE_BYTES,
    derive(c, mask) (a vector by name) for each vector of the block's channels into a stack
    `ChannelTable`, then body(c0, c1, derived) for the block [c0, c1), derived(c) reading the
    vectors at channel c back (with no `names`, body(c_begin, c_end, ...) alone)."""
    b = f.b
    if not names:
        body(f.args["c_begin"], f.args["c_end"], lambda c: {})
        return
    vectors = max(1, TABLE_BYTES // (len(names) * f.lanes * f.scalar_bytes))
    stack = f.slot(ir.ArrayType(f.vector, vectors * len(names)), "channel_table")
    span = f.i64(vectors * f.lanes)
    with f.loop(f.args["c_begin"], f.args["c_end"], span, "c_block") as c0:
        c1 = b.add(c0, span)
        c1 = b.select(b.icmp_signed("<", c1, f.args["c_end"]), c1, f.args["c_end"], name="c1")
        table = ChannelTable(f, names, stack, c0)
        table.fill(derive, c1)
        body(c0, c1, table.read)


def load_vector(f: Function, ptr, mask, name: str = ""):
    return f.vload(ptr, name=name) if mask is None else f.masked_load(ptr, mask, name=name)


def store_vector(f: Function, value, ptr, mask) -> None:
    if mask is None:
        f.vstore(value, ptr)
    else:
        f.masked_store(value, ptr, mask)


def streaming(f: Function, v: dict):
    """Whether a kernel's outputs stream past the caches (an i1): its `streaming` field,
    which the arena sets (`Arena.streams`)."""
    return f.b.icmp_signed("!=", v["streaming"], f.i64(0), name="streaming")


def put_vector(f: Function, value, ptr, mask, streams) -> None:
    """`store_vector`, a whole vector (of any number of lanes) past the caches where
    `streams` holds and `ptr` sits on the vector's size."""
    if mask is not None:
        f.masked_store(value, ptr, mask)
        return
    aligned = f.on_vector(ptr, value.type.count)
    with f.b.if_else(f.b.and_(streams, aligned)) as (past_caches, through_caches):
        with past_caches:
            f.stream_store(value, ptr)
        with through_caches:
            f.vstore(value, ptr)


def fence_streams(f: Function, streams) -> None:
    """After a kernel's last store: where it streamed, its stores fenced."""
    with f.b.if_then(streams):
        f.store_fence()


TRUE, FALSE = ir.Constant(I1, 1), ir.Constant(I1, 0)


def lanes_within(f: Function, first, low, high):
    """Lanes i of one vector whose index first + i lies in [low, high)."""
    index = f.b.add(f.splat_int(first, "first_lanes"),
                    ir.Constant(ir.VectorType(I64, f.lanes), list(range(f.lanes))), name="lane")
    return f.b.and_(f.b.icmp_signed(">=", index, f.splat_int(low, "low_lanes")),
                    f.b.icmp_signed("<", index, f.splat_int(high, "high_lanes")),
                    name="lanes_within")


def pooled_vector(f: Function, v: dict, tensor: str, base, window, before, channels,
                  at, c, mask, name: str = ""):
    """The vector of channels from c at pixel `at` = (n, oh, ow) of `tensor` (its base pointer
    `base`, `channels` wide) average-pooled over `window` x `window` blocks and zero-padded by
    `before` channels: the mean of the block at (oh * window, ow * window) in channels
    c - before on, zero where those are not the tensor's. The taps are summed in row-major
    order, then divided (ops/pool.py avg_pool_reference)."""
    b = f.b
    n, oh, ow = at
    source = b.sub(c, before, name=f"{name}.channel")
    valid = lanes_within(f, source, f.i64(0), channels)
    valid = valid if mask is None else b.and_(valid, mask)
    origin = b.add(offset(f, v, tensor, n, b.mul(oh, window), b.mul(ow, window)), source,
                   name=f"{name}.block")
    total = f.slot(f.vector, f"{name}.total", f.vconst(0.0))
    with f.loop(0, window, 1, f"{name}.i") as i:
        row = b.add(origin, b.mul(i, v[f"{tensor}.row"]))
        with f.loop(0, window, 1, f"{name}.j") as j:
            tap = f.element(base, b.add(row, b.mul(j, v[f"{tensor}.pixel"])))
            f.set(total, b.fadd(f.get(total), f.masked_load(tap, valid, name=f"{name}.tap")))
    count = f.splat(b.uitofp(b.mul(window, window), f.scalar), name=f"{name}.count")
    return b.fdiv(f.get(total), count, name=name)
