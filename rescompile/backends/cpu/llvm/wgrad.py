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

With `dot="dpbf16"` (bfloat16 x and dy, a target with AVX512-BF16) the tile multiplies pairs of
pixels: vdpbf16ps sums two products a lane, so each step takes two pixels' dy (NV vectors of
16 channels' pairs) and the two pixels' x at one depth (a broadcast pair). The block is
`staged` in that layout: dy pair after pair (`stage_dy_pairs`); x either as the slab's
elements each beside the one a pixel on (`stage_slab_pairs`: a pixel's window element and its
right neighbour's, so a pair of pixels of one output row reads one pair at its window
offsets), or through the prologue a vector of channels of two pixels interleaved
(`stage_block`, then `interleave_block`). Pairs lie within an output row (a run of the slab),
or anywhere in the block where the prologue staged it; a run of odd length pairs its last pixel
with a dy of zeros.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from llvmlite import ir

from ....precision import ITEMSIZE
from ..target import Target
from ..tuning import WGRAD_BLOCK as BLOCK, conv_tile, widens
from . import abi
from .emit import BF16, I32, I64, L2_LOCALITY, Function, Tiled, new_module, on_line
from .epilogue import Chain, apply_chain, channel_operands
from .pixels import (FALSE, TRUE, PixelWalk, channel_vectors, load_vector, next_pixel, offset,
                     store_vector)
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
    dot: str = field(default="fma", kw_only=True)  # or "dpbf16": pairs of pixels

    def __post_init__(self):
        mr, nv = conv_tile(self.target, self.dtype)
        object.__setattr__(self, "mr", self.mr or mr)
        object.__setattr__(self, "nv", self.nv or nv)
        object.__setattr__(self, "prologue", tuple(self.prologue))

    @property
    def symbol(self) -> str:
        steps = f"_in_{'_'.join(self.prologue)}" if self.prologue else ""
        pairs = "_pairs" if self.paired else ""
        return (f"wgrad_{self.dtype}_{self.target.isa}_{self.mr}x{self.nr}{pairs}{steps}"
                f"{self.storage_tag()}")

    @property
    def prologue_chain(self) -> Chain:
        return Chain(self.prologue)

    @property
    def paired(self) -> bool:
        """Whether the tile multiplies pairs of pixels (vdpbf16ps)."""
        return self.dot == "dpbf16"

    @property
    def widened(self) -> bool:
        """Whether each block's x and dy are widened into the scratch (stored narrower, and
        multiplied by FMAs)."""
        return widens(self.element("x"), self.dtype) and not self.paired

    @property
    def staged(self) -> bool:
        """Whether each block's x and dy are in the scratch: widened, or in pairs."""
        return self.widened or self.paired

    @property
    def widens(self) -> bool:
        return False  # a narrower x is staged widened

    @property
    def staged_type(self) -> str:
        """The type of x staged through a prologue: the compute type where the block is
        `widened` (rounded to x's type first), else x's."""
        return self.dtype if self.widened else self.element("x")

    def scratch_for(self, fields: dict, channels: int) -> int:
        """The per-thread scratch for a step's sizes (`fields`): a block of x through the
        prologue, or its `slab_rows` widened or in pairs (an element and its pair, 4 bytes,
        as a float32); then, `staged`, its dy of `channels` (no more pairs than pixels)."""
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

    def check_types(self) -> None:
        """Pairs of pixels need bfloat16 x and dy, float32 sums and AVX512-BF16."""
        if not self.paired:
            return
        if (self.element("x"), self.element("dy"), self.dtype) != (BF16, BF16, "float32"):
            raise ValueError(f"{self.symbol}: dpbf16 needs bfloat16 x and dy, float32 sums")
        if not self.target.has("avx512_bf16"):
            raise ValueError(f"{self.symbol}: dpbf16 needs a target with avx512_bf16")

    def ir(self) -> str:
        self.check_types()
        module = new_module(self.symbol)
        f = abi.new_function(module, self.symbol, self.dtype, self.lanes, self.target)
        if self.paired:
            f.require(self.target.features_for("avx512_bf16"))
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
        if k.staged:  # staged dy is contiguous, pixel (or pair) after pixel
            dy_rows = TRUE
            self.dy_row = b.mul(b.udiv(b.add(b.sub(f.args["c_end"], f.args["c_begin"]),
                                             f.i64(k.lanes - 1)), f.i64(k.lanes)),
                                f.i64(k.lanes), name="staged_dy_row")
        self.contiguous = b.and_(b.and_(x_rows, dy_rows),
                                 b.icmp_signed("==", v["stride"], f.i64(1)), name="contiguous")
        # the tile's runs of pixels: pairs lie within an output row of the slab, or anywhere
        # in a block the prologue staged
        self.across = (TRUE if k.prologue else FALSE) if k.paired else self.contiguous
        self.walk = PixelWalk(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], BLOCK, "block") as start:
            end = b.add(start, f.i64(BLOCK))
            end = b.select(b.icmp_signed("<", end, f.args["p_end"]), end, f.args["p_end"])
            origin = self.walk.position()
            if k.prologue:
                self.stage_block(start, end, origin)
                if k.paired:
                    self.interleave_block(start, end)
            elif k.paired:
                self.stage_slab_pairs(end, origin)
            elif k.staged:
                self.stage_rows(end, origin)
            if k.paired:
                self.stage_dy_pairs(start, end, origin)
            elif k.staged:
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

    def first_slab_row(self, origin):
        """The slab row of the first window row of the pixel at `origin`."""
        b, v = self.b, self.v
        n, oh, _ = origin
        return b.add(b.mul(n, self.slab_height), b.mul(oh, v["stride"]), name="first_row")

    def end_slab_row(self, end):
        """One past the slab row of the last window row of the pixel before `end`."""
        f, b, v = self.f, self.b, self.v
        per_image = b.mul(v["oh"], v["ow"])
        last = b.sub(end, f.i64(1), name="last_pixel")
        last_n, last_oh = b.udiv(last, per_image), b.udiv(b.urem(last, per_image), v["ow"])
        return b.add(b.add(b.mul(last_n, self.slab_height), b.mul(last_oh, v["stride"])),
                     v["kh"], name="end_row")

    def slab_source(self, row):
        """Where slab row `row` starts in x."""
        f, b, v = self.f, self.b, self.v
        image, i = b.udiv(row, self.slab_height), b.urem(row, self.slab_height)
        return f.element(self.ptr["x"], b.add(b.mul(image, v["x.image"]), b.mul(i, v["x.row"])),
                         name="x_row")

    def stage_rows(self, end, origin) -> None:
        """The input rows the block's windows cover, widened into the scratch: from the
        first pixel's first window row to the last pixel's last, each a run of the slab's
        row; `x_base` then addresses them as the tensor's pixels."""
        f, b = self.f, self.b
        b.comment("the block's input rows, widened")
        first = self.first_slab_row(origin)
        slab = self.ptr["scratch"]
        self.x_base = f.element(slab, b.neg(b.mul(first, self.x_row)), name="slab_base")
        with f.loop(first, self.end_slab_row(end), 1, "slab_row") as row:
            source = self.slab_source(row)
            into = f.element(self.x_base, b.mul(row, self.x_row), name="slab_row")

            def widen(at, mask):
                x = load_vector(f, f.element(source, at), mask, name="x")
                store_vector(f, x, f.element(into, at), mask)
            channel_vectors(f, widen, f.i64(0), self.x_row)

    def stage_slab_pairs(self, end, origin) -> None:
        """The input rows the block's windows cover, as `stage_rows`, each element paired
        with the one a pixel on in its row (the next pixel's window element), zero past the
        row; `x_base` then addresses the pairs as the tensor's pixels."""
        f, b = self.f, self.b
        b.comment("the block's input rows, each element beside its next pixel's")
        first = self.first_slab_row(origin)
        slab = b.bitcast(self.ptr["scratch"], I32.as_pointer(), name="slab_pairs")
        self.x_base = f.element(slab, b.neg(b.mul(first, self.x_row)), name="slab_base")
        neighbour = self.pixel_step
        with f.loop(first, self.end_slab_row(end), 1, "slab_row") as row:
            source = self.slab_source(row)
            into = f.element(self.x_base, b.mul(row, self.x_row), name="slab_row")

            def pair(at, mask):
                beyond = b.sub(b.sub(self.x_row, at), neighbour, name="neighbours_left")
                x = f.load_bits(f.element(source, at), mask, name="x")
                right = f.load_bits(f.element(source, b.add(at, neighbour)),
                                    f.mask(0, beyond), name="x_right")
                store_vector(f, f.paired(x, right), f.element(into, at), mask)
            channel_vectors(f, pair, f.i64(0), self.x_row)

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

    def stage_dy_pairs(self, start, end, origin) -> None:
        """The block's dy of the call's channels in the tile's pairs of pixels (`tile_runs`):
        each pair's channels interleaved, `dy_row` apart; a run's odd last pixel beside
        zeros."""
        f, b, v = self.f, self.b, self.v
        b.comment("the block's dy, pixels in pairs")
        self.staged_dy = b.bitcast(f.element(self.ptr["scratch"], v["dy_offset"]),
                                   I32.as_pointer(), name="staged_dy")
        self.walk.move_to(*origin)
        with self.tile_runs(start, end) as (_, run, _, pair):
            run_start = self.walk.position()
            with f.loop(0, b.lshr(b.add(run, f.i64(1)), f.i64(1)), 1, "dy_pair") as q:
                second = b.icmp_signed("<", b.add(b.mul(q, f.i64(2)), f.i64(1)), run,
                                       name="second")
                first_at = f.element(self.ptr["dy"], offset(f, v, "dy", *self.walk.position()))
                self.walk.move_to(*next_pixel(f, v["oh"], v["ow"], *self.walk.position()))
                second_at = f.element(self.ptr["dy"], offset(f, v, "dy", *self.walk.position()))
                self.walk.move_to(*next_pixel(f, v["oh"], v["ow"], *self.walk.position(),
                                              second))
                into = f.element(self.staged_dy, b.sub(b.mul(b.add(pair, q), self.dy_row),
                                                       f.args["c_begin"]))

                def pair_up(c, mask):
                    present = f.splat_flag(second)
                    dy = f.load_bits(f.element(first_at, c), mask, name="dy")
                    dy_next = f.load_bits(f.element(second_at, c), present if mask is None
                                          else b.and_(mask, present), name="dy_next")
                    store_vector(f, f.paired(dy, dy_next), f.element(into, c), mask)
                channel_vectors(f, pair_up)
            self.walk.move_to(*run_start)  # where `tile_runs` moves it on from

    def interleave_block(self, start, end) -> None:
        """The block staged through the prologue ([vector][pixel][lane], bfloat16) in pairs of
        pixels, in place ([vector][pair][lane], each lane the two pixels' channel): a zero
        pixel past an odd count first."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment("the staged block, pixels in pairs")
        count = b.sub(end, start, name="staged_pixels")
        words = self.staged
        with f.loop(0, v["cin"], k.lanes, "pair_vector") as ci:
            base = f.element(words, b.mul(ci, f.i64(BLOCK)))
            with b.if_then(b.icmp_unsigned("!=", b.and_(count, f.i64(1)), f.i64(0))):
                zeros = ir.Constant(ir.VectorType(words.type.pointee, k.lanes), None)
                b.store(zeros, f.vptr(f.element(base, b.mul(count, f.i64(k.lanes)))), align=2)
            with f.loop(0, count, 2, "pixel_pair") as p:
                at = f.element(base, b.mul(p, f.i64(k.lanes)))
                pixel = f.load_bits(at, name="pixel")
                next_one = f.load_bits(f.element(at, k.lanes), name="next_pixel")
                f.vstore(f.paired(pixel, next_one), b.bitcast(at, I32.as_pointer()))
        self.staged = b.bitcast(words, I32.as_pointer(), name="staged_pairs")

    @contextlib.contextmanager
    def tile_runs(self, start, end):
        """The tile's runs over the block from the walk's position (`across` rows or not):
        yields each run's first pixel, its length, where x holds that pixel's window origin
        (`run_from`) and, `paired`, its first pair (an odd run takes a pair more than half
        its pixels), else None; moves the walk past the run after."""
        f, b = self.f, self.b
        pair = f.slot(I64, "first_pair", f.i64(0)) if self.k.paired else None
        with f.runs(start, end, "run") as (p, step):
            run, x_at = self.run_from(p, end, self.across)
            yield p, run, x_at, None if pair is None else f.get(pair)
            if pair is not None:
                f.set(pair, b.add(f.get(pair), b.lshr(b.add(run, f.i64(1)), f.i64(1))))
            self.skip(run, self.across)
            step(run)

    def skip(self, run, across) -> None:
        """Move the walk past `run` pixels: within a row, its last pixel's successor; a run
        `across` rows may cross rows and images (once per block: a division)."""
        f, b, v = self.f, self.b, self.v
        n, oh, ow = self.walk.position()
        with b.if_else(across) as (over, within):
            with over:
                per_image = b.mul(v["oh"], v["ow"])
                at = b.add(b.add(b.mul(n, per_image), b.mul(oh, v["ow"])), b.add(ow, run))
                rest = b.urem(at, per_image)
                self.walk.move_to(b.udiv(at, per_image), b.udiv(rest, v["ow"]),
                                  b.urem(rest, v["ow"]))
            with within:
                self.walk.move_to(n, oh, b.add(ow, b.sub(run, f.i64(1))))
                self.walk.advance()

    def run_from(self, p, end, across):
        """The pixels from p (the walk's position) to its output row's end, or to `end`
        (`across` rows), and where x holds p's window origin."""
        f, b, v = self.f, self.b, self.v
        n, oh, ow = self.walk.position()
        run = b.select(across, b.sub(end, p), b.sub(v["ow"], ow))
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
        staged = self.ptr["scratch"] if k.widened else b.bitcast(
            self.ptr["scratch"], self.ptr["x"].type, name="staged")
        next_block = b.mul(self.pixel_step, f.i64(BLOCK), name="next_block")

        def channels(ci, mask):
            chain = k.prologue_chain
            operand = channel_operands(f, chain, self.ptr, ci, mask)
            derived = chain.derive(f, lambda o: operand[o.role], v)  # once a block's vector
            self.walk.move_to(*origin)
            with f.runs(start, end, "stage_row") as (p, step):
                run, x_at = self.run_from(p, end, self.contiguous)
                into = f.element(staged, b.add(b.mul(ci, f.i64(BLOCK)),
                                               b.mul(b.sub(p, start), f.i64(k.lanes))))
                with f.loop(0, run, 1, "q") as q:
                    at = f.element(x_at, b.add(b.mul(q, self.pixel_step), ci))
                    # the next block's same channels into L2, where its staging will read them
                    f.prefetch(f.element(at, next_block, name="x.next_block"), L2_LOCALITY)
                    x = load_vector(f, at, mask, name="x")
                    value = apply_chain(f, chain, x, lambda o: operand[o.role], v,
                                        derived=derived)
                    if k.widened:  # rounded to x's type, as the graph would store it
                        value = f.read_back(f.stored_form(value, self.ptr["x"]), self.ptr["x"])
                    store_vector(f, value, f.element(into, b.mul(q, f.i64(k.lanes))), mask)
                self.skip(run, self.contiguous)
                step(run)

        channel_vectors(f, channels, f.i64(0), v["cin"])
        self.staged = staged

    def depth_offsets(self, k0) -> list:
        """Element offsets (pairs, `paired`), from a pixel's window origin, of the tile's
        depth rows (rows past K repeat the last)."""
        f, b, k = self.f, self.b, self.k
        last = b.sub(self.depth, f.i64(1))
        per_vector = f.i64(BLOCK * k.lanes // (2 if k.paired else 1))
        offsets = []
        for m in range(k.mr):
            depth = b.add(k0, f.i64(m))
            depth = b.select(b.icmp_signed("<", depth, self.depth), depth, last)
            if k.prologue:  # a 1 x 1 window: the depth is the channel, staged by vectors
                lanes = f.i64(k.lanes)
                offsets.append(b.add(b.mul(b.udiv(depth, lanes), per_vector),
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
        x_step = f.i64(k.lanes) if k.prologue else b.mul(
            self.pixel_step, f.i64(2 if k.paired else 1), name="x_step")
        with self.tile_runs(start, end) as (p, run, x_at, pair):
            # one output row's run of pixels (or pairs): from the walk's position on
            n, oh, ow = self.walk.position()
            index = pair if k.paired else b.sub(p, start)
            if k.prologue:  # the block's staged pixels (`depth_offsets` picks the vector)
                x_at = f.element(self.staged, b.mul(index, f.i64(k.lanes)))
            if k.staged:
                dy_at = f.element(self.staged_dy, b.add(b.mul(index, self.dy_row),
                                                        b.sub(c, f.args["c_begin"])))
            else:
                dy_at = f.element(self.ptr["dy"], b.add(offset(f, v, "dy", n, oh, ow), c))
            x_ptr = f.slot(x_at.type, "x_at", x_at)
            dy_ptr = f.slot(dy_at.type, "dy_at", dy_at)
            steps = b.lshr(b.add(run, f.i64(1)), f.i64(1)) if k.paired else run
            with f.loop(0, steps, 1, "q"):
                here, grads = f.get(x_ptr), f.get(dy_ptr)
                (self.pair_step if k.paired else self.fma_step)(acc, here, grads, offsets,
                                                                masks)
                f.set(x_ptr, f.element(here, x_step))
                f.set(dy_ptr, f.element(grads, self.dy_row if k.staged else v["dy.pixel"]))
        b.comment("the tile into the slot (rows past K and lanes past the panel left out)")
        for m in range(k.mr):
            row = b.add(k0, f.i64(m))
            with b.if_then(b.icmp_signed("<", row, self.depth)):
                for j in range(k.nv):
                    column = b.add(c, f.i64(j * k.lanes))
                    left = None if masks is None else b.sub(width, f.i64(j * k.lanes))
                    add_f64(f, self.slot, row, column, f.get(acc[m][j]), left)

    def fma_step(self, acc, here, grads, offsets, masks) -> None:
        """One pixel: NV vectors of dy, MR broadcasts of x, MR x NV FMAs."""
        f, k = self.f, self.k
        dy = [load_vector(f, f.element(grads, j * k.lanes),
                          None if masks is None else masks[j]) for j in range(k.nv)]
        for m in range(k.mr):
            a = f.splat_element(f.element(here, offsets[m]), name=f"x{m}")
            for j in range(k.nv):
                f.set(acc[m][j], f.fma(a, dy[j], f.get(acc[m][j])))

    def pair_step(self, acc, here, grads, offsets, masks) -> None:
        """Two pixels: NV vectors of dy's channel pairs, MR broadcast pairs of x (the
        instruction's memory operand, as the conv's `_pair_step`), MR x NV vdpbf16ps."""
        f, b, k = self.f, self.b, self.k
        pairs = ir.VectorType(I32, k.lanes)
        dot = f.intrinsic("llvm.x86.avx512bf16.dpbf16ps.512", f.vector, [f.vector, pairs, pairs])
        dy = [f.load_bits(f.element(grads, j * k.lanes), None if masks is None else masks[j],
                          name=f"dy{j}") for j in range(k.nv)]
        for m in range(k.mr):
            a = f.splat_int32(b.load(f.element(here, offsets[m]), name=f"x{m}.pair"),
                              name=f"x{m}")
            for j in range(k.nv):
                f.set(acc[m][j], b.call(dot, [f.get(acc[m][j]), dy[j], a]))
