"""The weight-gradient micro-kernel: dW[k, co] = sum over pixels p of x[window(p) + k] *
dy[p, co], register-blocked, reducing over pixels.

Design note
-----------
The tile is MR rows of the depth K = kh * kw * cin (k = (i, j, ci), window row i at
`i * x.row`, then kw * cin consecutive elements, as in the forward tile) by NR = NV vectors of
output channels. Per pixel: NV vector loads of dy (its output channels are contiguous), MR
broadcasts of x (MR depth offsets from the pixel's window origin), MR * NV fused multiply-adds.

A call covers pixels [p_begin, p_end), one chunk of a fixed cut (`slots.py`), and output
channels [c_begin, c_end). It walks its pixels in blocks of WGRAD_BLOCK pixels (`tuning.py`):
for each block, every (depth tile, channel panel) pair accumulates the block in registers and
adds the tile into the call's float64 slot [K][width]. Within a block, pixels
are walked one output row at a time, so the inner loop only steps two pointers; where x and dy
are both contiguous across rows and images (a 1 x 1, stride-1 layer), the whole block is one
run.

Depth tiles past K repeat its last row and are not stored; the last channel panel loads and
adds masked.

With a `prologue` (a 1 x 1 layer's batch norm and ReLU, `passes/prologue.py`), each block's
pixels are first staged into the thread's scratch, every input channel through the chain and
rounded to the input's type (`stage_block`: a vector of channels at a time over the block's
pixels, so the chain's per-channel arithmetic is done once a vector), and the tiles read the
block there, contiguous.

Where x and dy are stored narrower than the compute type (bfloat16 on fused multiply-adds),
the tile would widen MR broadcasts and NV vectors a pixel, on the shift and shuffle ports its
FMAs share; it is `staged` instead: each block's input rows (`stage_rows`: the input rows its
pixels' windows cover, (ow - 1) * stride + kw columns each, the slab `slab_rows` bounds) and
its dy (`stage_dy`) are widened into the scratch once, and every (depth tile, channel panel)
pair reads them there in the compute type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ....precision import ITEMSIZE
from ..target import Target
from ..tuning import WGRAD_BLOCK as BLOCK, conv_tile, widens
from . import abi
from .emit import L2_LOCALITY, Function, Tiled, new_module, on_line
from .epilogue import Chain, apply_chain, channel_operands
from .pixels import TRUE, PixelWalk, channel_vectors, load_vector, offset, store_vector
from .slots import add_f64, statistics_slot


def slab_columns(fields: dict) -> int:
    """The input columns a row of output pixels' windows cover."""
    return (fields["ow"] - 1) * fields["stride"] + fields["kw"]


def slab_height(fields: dict) -> int:
    """An image's input rows up to the last a window reads."""
    return (fields["oh"] - 1) * fields["stride"] + fields["kh"]


def slab_rows(fields: dict) -> int:
    """The most input rows the windows of a block's pixels cover, counted from the block's
    first window row to its last through the images between (each image's rows up to the
    last any window reads): the T output rows a run of BLOCK pixels touches, each `stride`
    rows on, the last one's kh, and at each of the images' boundaries among them kh - stride
    rows more (as many boundaries as T rows can cross, or as few where that is negative)."""
    oh, ow, stride, kh = fields["oh"], fields["ow"], fields["stride"], fields["kh"]
    touched = -(-(BLOCK + ow - 1) // ow)
    boundaries = (touched + oh - 2) // oh if kh >= stride else (touched - 1) // oh
    return (touched - 1) * stride + kh + boundaries * (kh - stride)


@dataclass(frozen=True)
class WgradKernel(Tiled):
    dtype: str
    target: Target
    mr: int = 0
    nv: int = 0
    prologue: tuple[str, ...] = field(default=(), kw_only=True)
    storage: tuple[tuple[str, str], ...] = field(default=(), kw_only=True)

    def __post_init__(self):
        mr, nv = conv_tile(self.target, self.dtype)
        object.__setattr__(self, "mr", self.mr or mr)
        object.__setattr__(self, "nv", self.nv or nv)
        object.__setattr__(self, "prologue", tuple(self.prologue))

    @property
    def symbol(self) -> str:
        steps = f"_in_{'_'.join(self.prologue)}" if self.prologue else ""
        return (f"wgrad_{self.dtype}_{self.target.isa}_{self.mr}x{self.nr}{steps}"
                f"{self.storage_tag()}")

    @property
    def prologue_chain(self) -> Chain:
        return Chain(self.prologue)

    @property
    def staged(self) -> bool:
        """Whether each block's x and dy are widened into the scratch (stored narrower)."""
        return widens(self.element("x"), self.dtype)

    @property
    def widens(self) -> bool:
        return False  # a narrower x is staged widened

    @property
    def staged_type(self) -> str:
        """The type of x staged through a prologue: the compute type where the block is
        `staged` (rounded to x's type first), else x's."""
        return self.dtype if self.staged else self.element("x")

    def scratch_for(self, fields: dict, channels: int) -> int:
        """The per-thread scratch for a step's sizes (`fields`): a block of x through the
        prologue, or its `slab_rows` widened; then, `staged`, its dy of `channels`."""
        if not self.staged:
            return on_line(self._x_bytes(fields))
        dy_offset = self.scratch_fields(fields)["dy_offset"]
        return (dy_offset + self._vectors(channels) * BLOCK) * ITEMSIZE[self.dtype]

    def scratch_fields(self, fields: dict) -> dict:
        """What a `staged` kernel is told of its scratch, as the step's fields: where the
        staged dy starts, in elements of the compute type (past the staged x, on a cache
        line), and without a prologue the slab's row (elements) and image (rows) strides."""
        offset = {"dy_offset": on_line(self._x_bytes(fields)) // ITEMSIZE[self.dtype]}
        if self.prologue:
            return offset
        return dict(offset, slab_row=slab_columns(fields) * fields["cin"],
                    slab_height=slab_height(fields))

    def _x_bytes(self, fields: dict) -> int:
        """The staged x: a block of pixels through the prologue, or the slab."""
        if self.prologue:
            return self._vectors(fields["cin"]) * BLOCK * ITEMSIZE[self.staged_type]
        if self.staged:
            return slab_rows(fields) * slab_columns(fields) * fields["cin"] \
                * ITEMSIZE[self.dtype]
        return 0

    def _vectors(self, channels: int) -> int:
        """`channels` as whole vectors' elements."""
        return -(-channels // self.lanes) * self.lanes

    @property
    def signature(self) -> abi.Signature:
        signature = (abi.sizes("cin", "kh", "kw", "stride", "oh", "ow")
                     + abi.strides("x", "dy") + abi.sizes("chunk", "width")
                     + abi.stored(self, "x", "dy")
                     + abi.pointers("float64", "partial", written=True))
        if self.prologue:
            signature += self.prologue_chain.signature(self)
        if self.staged:
            signature += abi.sizes("dy_offset", *(() if self.prologue
                                                  else ("slab_row", "slab_height")))
        if self.prologue or self.staged:
            signature += abi.pointers(self.dtype, "scratch")
        return signature

    def ir(self) -> str:
        module = new_module(self.symbol)
        f = abi.new_function(module, self.symbol, self.dtype, self.lanes, self.target)
        f.b.comment(f"{self.symbol}: a {self.mr} x {self.nr} tile of depth by output channels")
        v, ptr = abi.load_arguments(f, self.signature)
        _Emitter(self, f, v, ptr).emit()
        f.finish()
        return str(module)


class _Emitter:
    def __init__(self, kernel: WgradKernel, f: Function, v, ptr):
        self.k, self.f, self.b, self.v, self.ptr = kernel, f, f.b, v, ptr

    def emit(self) -> None:
        f, b, k, v = self.f, self.b, self.k, self.v
        self.row_depth = b.mul(v["kw"], v["cin"], name="row_depth")
        self.depth = b.mul(v["kh"], self.row_depth, name="depth")
        self.slot = statistics_slot(f, self.ptr["partial"], v["chunk"], v["width"], self.depth)
        self.pixel_step = b.mul(v["x.pixel"], v["stride"], name="x_pixel_step")
        self.x_base, self.x_row, self.x_image = self.ptr["x"], v["x.row"], v["x.image"]
        if k.staged and not k.prologue:  # the slab's strides (`WgradKernel.scratch_fields`)
            self.x_row, self.slab_height = v["slab_row"], v["slab_height"]
            self.x_image = b.mul(self.slab_height, self.x_row, name="slab_image")
        x_rows = b.and_(b.icmp_signed("==", self.x_row, b.mul(v["ow"], self.pixel_step)),
                        b.icmp_signed("==", self.x_image, b.mul(v["oh"], self.x_row)))
        dy_rows = b.and_(b.icmp_signed("==", v["dy.row"], b.mul(v["ow"], v["dy.pixel"])),
                         b.icmp_signed("==", v["dy.image"], b.mul(v["oh"], v["dy.row"])))
        if k.staged:  # staged dy is contiguous, pixel after pixel
            dy_rows = TRUE
            self.dy_row = b.mul(b.udiv(b.add(b.sub(f.args["c_end"], f.args["c_begin"]),
                                             f.i64(k.lanes - 1)), f.i64(k.lanes)),
                                f.i64(k.lanes), name="staged_dy_row")
        self.contiguous = b.and_(b.and_(x_rows, dy_rows),
                                 b.icmp_signed("==", v["stride"], f.i64(1)), name="contiguous")
        self.walk = PixelWalk(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], BLOCK, "block") as start:
            end = b.add(start, f.i64(BLOCK))
            end = b.select(b.icmp_signed("<", end, f.args["p_end"]), end, f.args["p_end"])
            origin = self.walk.position()
            if k.prologue:
                self.stage_block(start, end, origin)
            elif k.staged:
                self.stage_rows(end, origin)
            if k.staged:
                self.stage_dy(start, end, origin)
            with f.loop(0, self.depth, k.mr, "k0") as k0:
                offsets = self.depth_offsets(k0)
                with f.loop(f.args["c_begin"], f.args["c_end"], k.nr, "c") as c:
                    width = b.sub(f.args["c_end"], c, name="width")
                    with b.if_else(b.icmp_signed(">=", width, f.i64(k.nr))) as (whole, part):
                        with whole:
                            self.walk.move_to(*origin)
                            self.block(start, end, k0, offsets, c, width, None)
                        with part:
                            self.walk.move_to(*origin)
                            masks = [f.mask(j * k.lanes, width) for j in range(k.nv)]
                            self.block(start, end, k0, offsets, c, width, masks)
            # the next block starts where this one ended: the walk is there after the last pair

    def stage_rows(self, end, origin) -> None:
        """The input rows the block's windows cover, widened into the scratch: from the
        first pixel's first window row to the last pixel's last, each a run of the slab's
        row; `x_base` then addresses them as the tensor's pixels."""
        f, b, v = self.f, self.b, self.v
        b.comment("the block's input rows, widened")
        n, oh, _ = origin
        per_image = b.mul(v["oh"], v["ow"])
        last = b.sub(end, f.i64(1), name="last_pixel")
        last_n, last_oh = b.udiv(last, per_image), b.udiv(b.urem(last, per_image), v["ow"])
        first = b.add(b.mul(n, self.slab_height), b.mul(oh, v["stride"]), name="first_row")
        stop = b.add(b.add(b.mul(last_n, self.slab_height), b.mul(last_oh, v["stride"])),
                     v["kh"], name="end_row")
        slab = self.ptr["scratch"]
        self.x_base = f.element(slab, b.neg(b.mul(first, self.x_row)), name="slab_base")
        with f.loop(first, stop, 1, "slab_row") as row:
            image, i = b.udiv(row, self.slab_height), b.urem(row, self.slab_height)
            source = f.element(self.ptr["x"], b.add(b.mul(image, v["x.image"]),
                                                    b.mul(i, v["x.row"])), name="x_row")
            into = f.element(self.x_base, b.mul(row, self.x_row), name="slab_row")

            def widen(at, mask):
                x = load_vector(f, f.element(source, at), mask, name="x")
                store_vector(f, x, f.element(into, at), mask)
            channel_vectors(f, widen, f.i64(0), self.x_row)

    def stage_dy(self, start, end, origin) -> None:
        """The block's dy of the call's channels, widened into the scratch: pixel after pixel,
        `dy_row` apart."""
        f, b, v = self.f, self.b, self.v
        b.comment("the block's dy, widened")
        self.staged_dy = f.element(self.ptr["scratch"], v["dy_offset"], name="staged_dy")
        self.walk.move_to(*origin)
        with f.loop(start, end, 1, "dy_pixel") as p:
            source = f.element(self.ptr["dy"], offset(f, v, "dy", *self.walk.position()))
            into = f.element(self.staged_dy, b.sub(b.mul(b.sub(p, start), self.dy_row),
                                                   f.args["c_begin"]))

            def widen(c, mask):
                dy = load_vector(f, f.element(source, c), mask, name="dy")
                store_vector(f, dy, f.element(into, c), mask)
            channel_vectors(f, widen)
            self.walk.advance()

    def skip(self, run) -> None:
        """Move the walk past `run` pixels: within a row, its last pixel's successor; a
        contiguous run may cross rows and images (once per block: a division)."""
        f, b, v = self.f, self.b, self.v
        n, oh, ow = self.walk.position()
        with b.if_else(self.contiguous) as (across, within):
            with across:
                per_image = b.mul(v["oh"], v["ow"])
                at = b.add(b.add(b.mul(n, per_image), b.mul(oh, v["ow"])), b.add(ow, run))
                rest = b.urem(at, per_image)
                self.walk.move_to(b.udiv(at, per_image), b.udiv(rest, v["ow"]),
                                  b.urem(rest, v["ow"]))
            with within:
                self.walk.move_to(n, oh, b.add(ow, b.sub(run, f.i64(1))))
                self.walk.advance()

    def run_from(self, p, end):
        """The pixels from p (the walk's position) to its output row's end, or to `end`
        (across rows where x and dy are contiguous), and where x holds p's window origin."""
        f, b, v = self.f, self.b, self.v
        n, oh, ow = self.walk.position()
        run = b.select(self.contiguous, b.sub(end, p), b.sub(v["ow"], ow))
        run = b.select(b.icmp_signed("<", b.add(p, run), end), run, b.sub(end, p))
        x_at = f.element(self.x_base, b.add(b.add(b.mul(n, self.x_image),
                                                   b.mul(b.mul(oh, v["stride"]), self.x_row)),
                                             b.mul(ow, self.pixel_step)))
        return run, x_at

    def stage_block(self, start, end, origin) -> None:
        """The block's pixels through the prologue into the scratch, by vectors of channels
        ([vector][pixel][lane]: a tile's rows stream through one vector's run): a vector of
        channels at a time over every pixel, prefetching the next block's."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment(f"prologue: the block's pixels through {', '.join(k.prologue)}")
        staged = self.ptr["scratch"] if k.staged else b.bitcast(
            self.ptr["scratch"], self.ptr["x"].type, name="staged")
        next_block = b.mul(self.pixel_step, f.i64(BLOCK), name="next_block")

        def channels(ci, mask):
            chain = k.prologue_chain
            operand = channel_operands(f, chain, self.ptr, ci, mask)
            derived = chain.derive(f, lambda o: operand[o.role], v)  # once a block's vector
            self.walk.move_to(*origin)
            with f.runs(start, end, "stage_row") as (p, step):
                run, x_at = self.run_from(p, end)
                into = f.element(staged, b.add(b.mul(ci, f.i64(BLOCK)),
                                               b.mul(b.sub(p, start), f.i64(k.lanes))))
                with f.loop(0, run, 1, "q") as q:
                    at = f.element(x_at, b.add(b.mul(q, self.pixel_step), ci))
                    # the next block's same channels into L2, where its staging will read them
                    f.prefetch(f.element(at, next_block, name="x.next_block"), L2_LOCALITY)
                    x = load_vector(f, at, mask, name="x")
                    value = apply_chain(f, chain, x, lambda o: operand[o.role], v,
                                        derived=derived)
                    if k.staged:  # rounded to x's type, as the graph would store it
                        value = f.read_back(f.stored_form(value, self.ptr["x"]), self.ptr["x"])
                    store_vector(f, value, f.element(into, b.mul(q, f.i64(k.lanes))), mask)
                self.skip(run)
                step(run)

        channel_vectors(f, channels, f.i64(0), v["cin"])
        self.staged = staged

    def depth_offsets(self, k0) -> list:
        """Element offsets, from a pixel's window origin, of the tile's depth rows (rows past K
        repeat the last)."""
        f, b, k = self.f, self.b, self.k
        last = b.sub(self.depth, f.i64(1))
        offsets = []
        for m in range(k.mr):
            depth = b.add(k0, f.i64(m))
            depth = b.select(b.icmp_signed("<", depth, self.depth), depth, last)
            if k.prologue:  # a 1 x 1 window: the depth is the channel, staged by vectors
                lanes = f.i64(k.lanes)
                offsets.append(b.add(b.mul(b.udiv(depth, lanes), f.i64(BLOCK * k.lanes)),
                                     b.urem(depth, lanes)))
                continue
            offsets.append(b.add(b.mul(b.udiv(depth, self.row_depth), self.x_row),
                                 b.urem(depth, self.row_depth)))
        return offsets

    def block(self, start, end, k0, offsets, c, width, masks) -> None:
        """The (depth tile, channel panel) pair over pixels [start, end), into the slot; with
        `masks`, the last panel's lanes below `width`."""
        f, b, k, v = self.f, self.b, self.k, self.v
        acc = [[f.slot(f.vector, f"acc{m}_{j}", f.vconst(0.0)) for j in range(k.nv)]
               for m in range(k.mr)]
        x_step = f.i64(k.lanes) if k.prologue else self.pixel_step
        with f.runs(start, end, "row") as (p, step):
            # one output row's run of pixels: from the walk's position to the row's end
            n, oh, ow = self.walk.position()
            run, x_at = self.run_from(p, end)
            if k.prologue:  # the block's staged pixels (`depth_offsets` picks the vector)
                x_at = f.element(self.staged, b.mul(b.sub(p, start), f.i64(k.lanes)))
            if k.staged:
                dy_at = f.element(self.staged_dy, b.add(b.mul(b.sub(p, start), self.dy_row),
                                                        b.sub(c, f.args["c_begin"])))
            else:
                dy_at = f.element(self.ptr["dy"], b.add(offset(f, v, "dy", n, oh, ow), c))
            x_ptr = f.slot(x_at.type, "x_at", x_at)
            dy_ptr = f.slot(dy_at.type, "dy_at", dy_at)
            with f.loop(0, run, 1, "q"):
                here, grads = f.get(x_ptr), f.get(dy_ptr)
                dy = [load_vector(f, f.element(grads, j * k.lanes),
                                  None if masks is None else masks[j]) for j in range(k.nv)]
                for m in range(k.mr):
                    a = f.splat_element(f.element(here, offsets[m]), name=f"x{m}")
                    for j in range(k.nv):
                        f.set(acc[m][j], f.fma(a, dy[j], f.get(acc[m][j])))
                f.set(x_ptr, f.element(here, x_step))
                f.set(dy_ptr, f.element(grads, self.dy_row if k.staged else v["dy.pixel"]))
            self.skip(run)
            step(run)
        b.comment("the tile into the slot (rows past K and lanes past the panel left out)")
        for m in range(k.mr):
            row = b.add(k0, f.i64(m))
            with b.if_then(b.icmp_signed("<", row, self.depth)):
                for j in range(k.nv):
                    column = b.add(c, f.i64(j * k.lanes))
                    left = None if masks is None else b.sub(width, f.i64(j * k.lanes))
                    add_f64(f, self.slot, row, column, f.get(acc[m][j]), left)
