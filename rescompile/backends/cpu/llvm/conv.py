"""The convolution micro-kernel: implicit GEMM on NHWC activations, register-blocked, with the
epilogue applied in registers before the one store.

Design note
-----------
A call computes output pixels [p_begin, p_end) (counted over every image of the call, row
major) for output channels [c_begin, c_end). The tile is MR pixels by NR = NV vectors of
channels: MR * NV accumulators stay in registers while the k loop runs over every tap of the
window and every input channel (K = kh * kw * cin), then the epilogue steps run on the
accumulators and the tile is stored once. Per k step: NV loads of the packed weights, MR
broadcasts of the input, MR * NV fused multiply-adds (the shape of MLAS's and BLIS's sgemm
kernels; NUMBA-NOTES measured it at 63-85 GFLOP/s per core on ResNet-164's layers).

    for each tile of MR pixels:                row pointers computed once per tile
        for each panel of NR channels:         weights packed [panel][k][NR], zero-padded
            acc[MR][NV] = 0
            for tap (i, j), for c in cin:      acc += x[row m, tap, c] * w[k, :]
                                               (panels outer: prefetch w[next panel][k])
            epilogue steps on acc; store out (and out2)

No im2col: the input is read in place. Row m's input pointer is its pixel's window origin,
`n * x.image + oh * stride * x.row + ow * stride * cin`, and window row i adds `i * x.row` to
every row. The input's pixels are `cin` apart (channels innermost, no gaps), so the kw taps of a
window row are kw * cin consecutive elements, in the order the packed weights hold them: the
k loop is kh runs of kw * cin steps, whatever the stride and window size.
Padding is the caller's: the input is a zero-bordered buffer and `x` points at its top-left
corner (the borders were zeroed once, the producer writes only the interior). Every tensor a
pixel is read from or written to has its own (image, row, pixel) strides, so a producer can
write straight into the interior of the next conv's padded buffer.

Edges: a tile with fewer than MR pixels left repeats its last pixel's pointers (the loads stay
in bounds) and skips the stores of the extra rows; the last panel of a channel count that is
not a multiple of NR uses masked loads and stores. The order of the k loop does not depend on
the tile or the split, so every output gets the same arithmetic whichever thread or call
computes it.

Weights of a dense layer are a 1x1 kernel over 1x1 images: the head runs on the same tile.

With `sums` (training: an op of `reduce.SUMS`), the kernel also makes two per-channel sums of
its output over the call's pixels, in float64, into slot `p_begin / sums.chunk` of a
[slot][2][sums.width] buffer: the caller cuts a step into fixed chunks of pixels, one call each,
and combines the slots in order (`reduce.SlotSum`), so the sums do not depend on how many
threads ran the calls. Within a call, blocks of SUM_BLOCK pixels are summed in the kernel's
dtype, each then added into float64 (`slots.BlockSums`, the running sums kept in the thread's
scratch from tile to tile), so they depend neither on the tile nor on the instruction set
(AVX2 and AVX-512 make the same bits). The sums are
`reduce.ChannelSums`': batch_moments (y, y * y: a forward conv's batch statistics), or a data
gradient's batch-norm gradient sums (g, g * xhat, read against the batch norm's input
`sums.x`), so the reduction reads the gradient while it is in registers.

With a `prologue` (a chain of per-channel steps: a batch norm and its ReLU, `passes/prologue.py`)
the kernel reads its input through the chain: a 1 x 1 conv's tile first stages its MR rows of
input channels, each through the chain and rounded to the input's type, into the thread's
scratch (`stage_rows`), and the k loop reads them there; where FMAs multiply a bfloat16 input,
the rounded rows are staged widened (`staged_type`), so the k loop widens nothing and its
tile needs no registers for it. A conv without a prologue whose FMAs would widen its
bfloat16 input stages each tile row's window the same way (`stages_rows`), only widened: its
kh runs of kw * cin inputs one after the other, widened a vector at a time once a tile, in
place of a broadcast and a shift for each multiply-add of every panel (the shifts compete
with the FMAs for their pipes); the k loop reads a staged window as one run of kh * kw * cin
(`tuning.stages_windows` says which windows stage). A layer's chain is
evaluated as the elementwise kernel (or the epilogue making it as a second output) evaluates
it (`epilogue.apply_chain`), so its activation, never written, is the same bits as the
tensor it replaces.

An epilogue operand read through a pool ("pooled", the seed's shortcut) is read at each row's
(n, oh, ow), kept beside its window origin, as `epilogue.read_operand` reads it everywhere.

Registers and values are named by role in the IR: `x_row<m>` (a tile row's window origin),
`w<j>` (a weight vector), `a<m>` (a broadcast input), `acc<m>_<j>` (an accumulator), and each
epilogue step's result after its op (`relu2.m1_0`: row 1, vector 0).

Element types, as oneDNN's brgemm descriptor has them (dt_a, dt_b, dt_c, dt_d): the input
(`input_type`), the packed weights (`weight_type`), the accumulators, epilogue and per-channel
operands (`dtype`) and the outputs (`output_type`), each from `storage` (`emit.Vectors`); a
bfloat16 tensor is widened as it is loaded and rounded as it is stored, and what the epilogue
goes on to make of an output it stores (`out2`, the sums) is made of the stored value. How
the k loop multiplies (`dot`):

    fma      one input channel per step: a broadcast times NV weight vectors, fused multiply-
             adds in the compute type (any stored types; every instruction set)
    dpbf16   two input channels per step, for bfloat16 inputs and weights: a broadcast pair of
             inputs and NV vectors of weight pairs into `vdpbf16ps` (AVX512-BF16); the
             weights packed in pairs of consecutive k ([panel][K/2][NR][2], VNNI-2), which
             needs an even count of inputs per window row, kw * cin (the lowering takes it
             for an even cin)
    amx      AMX tiles (`amx.py`)

The products of bfloat16 pairs are exact in float32, so every dot product is its float32 sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from llvmlite import ir

from ....precision import ITEMSIZE
from ..target import Target
from ..tuning import SUM_BLOCK, conv_tile, widens
from . import abi, epilogue
from .emit import (BF16, CACHE_LINE, I8, I16, I32, L1_LOCALITY, L2_LOCALITY, MEMORY_TYPES,
                   Tiled, new_module, on_line)
from .pixels import (TRUE, ChannelTable, PixelWalk, channel_vectors, fence_streams, load_vector,
                     next_pixel, offset, put_vector, store_vector, streaming)
from .reduce import sum_kind, sum_operands, sum_terms
from .slots import BlockSums, statistics_slot

GEOMETRY = abi.sizes("cin", "kh", "kw", "stride", "oh", "ow", "panels_outer") \
    + abi.placed("streaming")
PAIR = 2  # input channels per vdpbf16ps (and per AMX tile element pair)


@dataclass(frozen=True)
class ConvKernel(epilogue.Chained, Tiled):
    """What one compiled conv kernel computes; every size and stride is a run-time value."""
    dtype: str
    target: Target
    epilogue: tuple[str, ...] = ()
    out2: tuple[str, ...] | None = None
    mr: int = 0
    nv: int = 0
    sums: str | None = None  # an op of reduce.SUMS
    prologue: tuple[str, ...] = field(default=(), kw_only=True)
    stages_rows: bool = field(default=False, kw_only=True)  # into the scratch
    storage: tuple[tuple[str, str], ...] = field(default=(), kw_only=True)
    dot: str = field(default="fma", kw_only=True)  # one of DOTS
    DOTS: ClassVar[tuple[str, ...]] = ("fma", "dpbf16")  # amx: amx.AmxConvKernel

    def __post_init__(self):
        if self.dot not in self.DOTS:
            raise ValueError(f"{type(self).__name__}: dot must be one of {self.DOTS}, got "
                             f"{self.dot!r}")
        mr, nv = conv_tile(self.target, self.dtype)
        object.__setattr__(self, "mr", self.mr or mr)
        object.__setattr__(self, "nv", self.nv or nv)
        object.__setattr__(self, "epilogue", tuple(self.epilogue))
        object.__setattr__(self, "prologue", tuple(self.prologue))
        object.__setattr__(self, "stages_rows", self.stages_rows or bool(self.prologue))
        if self.out2 is not None:
            object.__setattr__(self, "out2", tuple(self.out2))
        self.chains  # noqa: B018 - checks every step has a rule
        if self.sums is not None:
            sum_kind(self.sums)

    @property
    def symbol(self) -> str:
        steps = self.chain_name("plain")
        if self.sums:
            steps += f"__sums_{sum_kind(self.sums).short}"
        if self.stages_rows:
            steps = f"in_{'_'.join(self.prologue or ('staged',))}__{steps}"
        return (f"conv_{self.dtype}_{self.target.isa}{self.dot_tag()}_{self.mr}x{self.nr}_"
                f"{steps}{self.storage_tag()}")

    def dot_tag(self) -> str:
        """A symbol's part for how the k loop multiplies: empty for fused multiply-adds."""
        return "" if self.dot == "fma" else f"_{self.dot}"

    @property
    def input_type(self) -> str:
        return self.element("x")

    @property
    def weight_type(self) -> str:
        return self.element("w")

    @property
    def output_type(self) -> str:
        return self.element("out")

    @property
    def pairs(self) -> int:
        """Input channels the packed weights interleave: PAIR for dpbf16 and amx, else 1."""
        return 1 if self.dot == "fma" else PAIR

    @property
    def staged_type(self) -> str:
        """The staged rows' type: the compute type where FMAs multiply them (each value
        rounded to the input's type first), so the k loop widens nothing; the input's for
        bfloat16 pairs."""
        return self.dtype if self.dot == "fma" else self.input_type

    @property
    def widens(self) -> bool:
        """Whether the k loop widens its broadcast input (`tuning.widens`)."""
        return widens(self.input_type, self.dtype, self.dot, staged=self.stages_rows)

    @property
    def prologue_chain(self) -> epilogue.Chain:
        """The prologue's steps, numbered after the epilogue chains'."""
        return epilogue.Chain(self.prologue, self.chains[-1].end)

    def scratch_for(self, fields: dict, channels: int) -> int:
        """The per-thread scratch for a step's sizes (`fields`): the running block sums of
        `channels` (with `sums`), then, from `table_offset`, what the prologue derives of its
        operands for each of the cin input channels (`Chain.derive`), and, from
        `staged_offset`, the staged rows of a window of inputs each (kh * kw * cin:
        `stages_rows`)."""
        if not self.stages_rows:
            return self._block_sums_bytes(channels)
        window = fields["kh"] * fields["kw"] * fields["cin"]
        return self.scratch_fields(fields, channels)["staged_offset"] \
            + self.mr * window * ITEMSIZE[self.staged_type]

    def scratch_fields(self, fields: dict, channels: int) -> dict:
        """Where the scratch's parts start, in bytes, as the step's fields
        (`scratch_for`)."""
        table = on_line(self._block_sums_bytes(channels))
        derived = len(self.prologue_chain.derived_names)
        staged = table + on_line(-(-fields["cin"] // self.lanes) * self.lanes * derived
                                  * ITEMSIZE[self.dtype])
        return {"table_offset": table, "staged_offset": staged} if derived \
            else {"staged_offset": staged}

    def _block_sums_bytes(self, channels: int) -> int:
        """Two rows of running sums (`slots.BlockSums`), with `sums`."""
        return 2 * channels * ITEMSIZE[self.dtype] if self.sums else 0

    @property
    def sum_against(self) -> list[str]:
        """The batch norm's input the sums read (`sums.x`), if they read one."""
        return ["sums.x"] if "x" in self._sum_operands else []

    @property
    def _sum_operands(self) -> list[str]:
        return sum_operands(self.sums) if self.sums else []

    @property
    def signature(self) -> abi.Signature:
        """Geometry, the input (window origin), the packed weights, the outputs, the epilogue
        chains' operands and scalars, and the sums' operands, scalars and slots."""
        return GEOMETRY + self.tensors_signature()

    def tensors_signature(self) -> abi.Signature:
        """Every argument but the geometry: the input, the packed weights, the outputs, the
        epilogue chains' operands and scalars, and the sums' operands, scalars and slots."""
        signature = (abi.strides("x", *self.outputs, *self.sum_against)
                     + abi.stored(self, "x", "w") + abi.stored(self, *self.outputs, written=True))
        for chain in self.chains:
            signature += chain.signature(self)
        if self.prologue:
            signature += self.prologue_chain.signature(self)
        if self.stages_rows:
            signature += abi.sizes("staged_offset")
        if self.prologue_chain.derived_names:
            signature += abi.sizes("table_offset")
        if self.sums:
            signature += (abi.stored(self, *[f"sums.{n}" for n in self._sum_operands])
                          + abi.scalars(*[f"sums.{n}" for n in sum_kind(self.sums).scalars])
                          + abi.sizes("sums.chunk", "sums.width")
                          + abi.pointers("float64", "sums", written=True))
        if self.sums or self.stages_rows:
            signature += abi.pointers(self.dtype, "scratch")
        return signature

    @property
    def extension(self) -> str | None:
        """The target extension the k loop's instructions need."""
        return "avx512_bf16" if self.dot == "dpbf16" else None

    def check_types(self) -> None:
        """A k loop on bfloat16 pairs needs bfloat16 inputs and weights, and a target with the
        instructions' extension."""
        if self.extension is None:
            return
        if (self.input_type, self.weight_type) != (BF16, BF16):
            raise ValueError(f"{self.symbol}: {self.dot} needs bfloat16 inputs and weights")
        if not self.target.has(self.extension):
            raise ValueError(f"{self.symbol}: {self.dot} needs a target with "
                             f"{self.extension}")

    def ir(self) -> str:
        self.check_types()
        module = new_module(self.symbol)
        ConvEmitter(self, module).emit()
        return str(module)


class ConvEmitter:
    def __init__(self, kernel: ConvKernel, module: ir.Module, exact: bool = False):
        """The kernel's function, or with `exact` its twin that rounds every value exactly
        (`remake_if_suspect`)."""
        self.k, self.module = kernel, module
        # (on a target with AVX512-BF16 the function carries its features, as vdpbf16ps needs)
        self.f = abi.new_function(module, f"{kernel.symbol}.exact" if exact else kernel.symbol,
                                  kernel.dtype, kernel.lanes, kernel.target)
        if exact:
            self.f.rounds_exactly()
        self.b = self.f.b

    def flush_if_rounding(self) -> None:
        """Where vcvtneps2bf16 rounds the stored rows, run with denormals flushed: every value
        a row rounds (`store_row`) is made by arithmetic, which then makes no denormal."""
        if self.f.converts_bf16 and any(self.k.element(out) == BF16 for out in self.k.outputs):
            self.f.flush_denormals()

    def check_rounding_by_call(self) -> None:
        """A kernel without block sums may be called twice on the same arguments: its fast
        roundings are checked once for the call (`Function.checks_by_call`)."""
        if not self.k.sums:
            self.f.checks_by_call()

    def remake_if_suspect(self) -> None:
        """Where a fast rounding of the call was suspect, the call made again by the
        kernel's exact twin (`twin_kernel`), emitted here."""
        if self.f.suspected:
            twin = type(self)(self.twin_kernel(), self.module, exact=True)
            twin.emit()
            self.f.call_if_suspect(twin.f.fn)

    def twin_kernel(self) -> ConvKernel:
        """The kernel the exact twin makes: tiles of one row, whose code is a sixth of the
        kernel's or less. It runs only where a value was NaN, yet is compiled with every
        kernel that rounds the fast way (ResNet-164's bfloat16 inference, cold, on Zen 3:
        8.8-10.4 s without twins, 8.8-10.7 s with)."""
        return replace(self.k, mr=1)

    # -- arguments ----------------------------------------------------------------------
    def emit(self) -> None:
        f, b, k = self.f, self.b, self.k
        b.comment(f"{k.symbol}: a {k.mr} x {k.nr} tile of output pixels by channels")
        b.comment("arguments: sizes, strides (in elements) and scalars; pointers by role")
        self.v, self.ptr = abi.load_arguments(f, k.signature)
        self.flush_if_rounding()
        self.check_rounding_by_call()
        self.streams = streaming(f, self.v)
        v = self.v
        self.k_depth = b.mul(b.mul(v["kh"], v["kw"]), v["cin"], name="k_depth")
        self.x_row_step = b.mul(v["x.row"], v["stride"], name="x_row_step")
        self.x_pixel_step = b.mul(v["x.pixel"], v["stride"], name="x_pixel_step")
        self.row_depth = b.mul(v["kw"], v["cin"], name="row_depth")
        if k.sums:
            slot = statistics_slot(f, self.ptr["sums"], v["sums.chunk"], v["sums.width"], 2)
            self.block_sums = BlockSums(f, slot, self.ptr["scratch"])
            self.sum_scalars = {n: v[f"sums.{n}"] for n in sum_kind(k.sums).scalars}
        if k.stages_rows:
            self.staged = self.staging_area()
        self.derive_prologue()
        self.tiles()
        self.finish_tiles()
        fence_streams(f, self.streams)
        if k.sums:
            self.block_sums.finish()
        self.remake_if_suspect()
        f.finish()

    def finish_tiles(self) -> None:
        """After the last tile (the AMX kernel releases its tile registers here)."""

    # -- the tile loop --------------------------------------------------------------------
    def tiles(self) -> None:
        """Tiles outer: a tile's input stays in L1 while every panel of weights passes. With
        `panels_outer` set, panels outer: a panel stays in cache while every tile passes (the
        layers whose weights outweigh their pixels, whose weights would otherwise stream from
        memory once per tile); then each k step also prefetches the same step's weights of
        the next panel into L2, so the next panel streams in while this one's tiles compute
        (the hardware prefetcher starts afresh with each call, and at batch 1 a call of a wide
        layer is a panel or two: ResNet-18's 7 x 7, 512-channel layers took 0.82 ms without,
        0.67 ms with, on Zen 5). The AMX k loop (`amx.py`) loads its B tiles unprefetched."""
        f, b, k, v = self.f, self.b, self.k, self.v
        self.walk = PixelWalk(f, v["oh"], v["ow"])
        p_begin, p_end = f.args["p_begin"], f.args["p_end"]
        c_begin, c_end = f.args["c_begin"], f.args["c_end"]
        by_panel = b.icmp_signed("!=", v["panels_outer"], f.i64(0), name="by_panel")
        with b.if_else(by_panel) as (panels_first, tiles_first):
            with panels_first:
                self.next_panel = b.mul(self.k_depth, f.i64(k.nr), name="next_panel")
                with f.loop(c_begin, c_end, k.nr, "c") as c:
                    self.walk.restart()
                    with f.loop(p_begin, p_end, k.mr, "p") as p:
                        rows = self.tile_rows(p)
                        self.store_tile(self.accumulate(c), c, rows)
            with tiles_first:
                self.next_panel = None
                with f.loop(p_begin, p_end, k.mr, "p") as p:
                    rows = self.tile_rows(p)
                    with f.loop(c_begin, c_end, k.nr, "c") as c:
                        self.store_tile(self.accumulate(c), c, rows)

    def tile_rows(self, p):
        """Rows left from p (at most MR are used) and the tile's row pointers."""
        self.b.comment(f"tile of {self.k.mr} pixels from p: row pointers")
        rows = self.b.sub(self.f.args["p_end"], p, name="rows_left")
        self.tile_start = p
        self.row_pointers(rows)
        if self.k.stages_rows:
            self.stage_rows()
        return rows

    # -- the prologue: the tile's input rows through its chain, into the scratch -------------
    def staging_area(self):
        """Where the staged rows start (`ConvKernel.staged_offset`, in bytes), as a pointer of
        their type."""
        raw = self.b.gep(self.b.bitcast(self.ptr["scratch"], I8.as_pointer()),
                         [self.v["staged_offset"]])
        return self.b.bitcast(raw, MEMORY_TYPES[self.k.staged_type].as_pointer(),
                              name="staged")

    def derive_prologue(self) -> None:
        """What the prologue's steps make of their per-channel operands (a batch norm's
        scale and shift), once a call for every input channel, into the scratch's table;
        the staging reads it there."""
        f, b, k, v = self.f, self.b, self.k, self.v
        names = k.prologue_chain.derived_names
        self.prologue_table = None
        if not names:
            return
        b.comment(f"the prologue's {', '.join(names)} of every input channel, once a call")
        base = b.gep(b.bitcast(self.ptr["scratch"], I8.as_pointer()), [v["table_offset"]])
        self.prologue_table = ChannelTable(f, names, base, f.i64(0))
        self.prologue_table.fill(lambda ci, mask: k.prologue_chain.derive(
            f, lambda o: load_vector(f, f.element(self.ptr[o.role], ci), mask, name=o.role),
            v), v["cin"])

    def stage_rows(self) -> None:
        """Each tile row's input into the scratch in the staged type, a vector at a time: a
        1 x 1 window's channels through the prologue, rounded to the input's type, or a
        window widened (`stage_windows`); the k loop then reads the staged rows."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment(f"staging: the tile's {k.mr} input rows through "
                  f"{', '.join(k.prologue) or 'no prologue'}, in {k.staged_type}")
        staged = [f.element(self.staged, b.mul(f.i64(m), self.k_depth), name=f"staged{m}")
                  for m in range(k.mr)]
        self.prefetch_next_rows()
        if k.prologue:
            channel_vectors(f, lambda ci, mask: self.stage_vector(staged, ci, mask), f.i64(0),
                            v["cin"])
        else:
            self.stage_windows(staged)
        self.x_rows = staged

    def stage_windows(self, staged) -> None:
        """Each tile row's window, widened: its kh runs of kw * cin inputs one after the
        other, as the k loop reads them."""
        f, b, v = self.f, self.b, self.v
        with f.loop(0, v["kh"], 1, "si") as i:
            source = b.mul(i, v["x.row"], name="window_row")
            into = b.mul(i, self.row_depth, name="staged_row")

            def widen(ci, mask):
                for m, row in enumerate(staged):
                    x = load_vector(f, f.element(self.x_rows[m], b.add(source, ci)), mask,
                                    name=f"x{m}")
                    store_vector(f, x, f.element(row, b.add(into, ci)), mask)
            channel_vectors(f, widen, f.i64(0), self.row_depth)

    def prefetch_next_rows(self) -> None:
        """Into L1, the next tile's input rows (where the pixels run on: a guess past a row's
        end, which a prefetch may make): staging waits on its loads before the k loop can
        start, where the k loop alone overlaps its loads with its multiply-adds."""
        f, b, k, v = self.f, self.b, self.k, self.v
        ahead = b.mul(self.x_pixel_step, f.i64(k.mr), name="next_tile")
        row_bytes = b.mul(v["cin"], f.i64(ITEMSIZE[k.input_type]))
        for m in range(k.mr):
            start = b.bitcast(f.element(self.x_rows[m], ahead), I8.as_pointer(),
                              name=f"x_row{m}.next")
            with f.loop(0, row_bytes, CACHE_LINE, f"line{m}") as line:
                f.prefetch(b.gep(start, [line]), L1_LOCALITY)

    def stage_vector(self, staged, ci, mask) -> None:
        """One vector of channels of every row through the prologue, the rows' roundings
        checked once together (`rounded_once`)."""
        f, k = self.f, self.k
        chain = k.prologue_chain
        channel = epilogue.channel_operands(f, chain, self.ptr, ci, mask)
        derived = self.prologue_table.read(ci) if self.prologue_table else None

        def row(m):
            x = load_vector(f, f.element(self.x_rows[m], ci), mask, name=f"x{m}")
            value = epilogue.apply_chain(f, chain, x, lambda o: channel[o.role], self.v,
                                         f".in{m}", derived)
            # the activation as the tensor it replaces would hold it, in the staged type
            value = f.stored_form(value, self.ptr["x"])
            return value if k.staged_type == k.input_type else f.read_back(value, self.ptr["x"])
        rows = f.rounded_once(lambda: [row(m) for m in range(k.mr)])
        for m, value in enumerate(rows):
            store_vector(f, value, f.element(staged[m], ci), mask)

    def row_pointers(self, rows) -> None:
        """Per row m of the tile: the input window origin and each pixel tensor's offset.
        Rows past the last pixel repeat it. The next tile starts at the pixel after row MR-1."""
        f, b, k, v = self.f, self.b, self.k, self.v
        n, oh, ow = self.walk.position()
        last = b.sub(rows, f.i64(1), name="last_row")
        tensors = k.outputs + [r for chain in k.chains for r in chain.pixel_roles] \
            + k.sum_against
        self.x_rows, self.offsets, self.positions = [], {t: [] for t in tensors}, []
        for m in range(k.mr):
            self.positions.append((n, oh, ow))
            x_off = b.add(b.add(b.mul(n, v["x.image"], name="x.image_off"),
                                b.mul(oh, self.x_row_step, name="x.row_off"), name="x.row_start"),
                          b.mul(ow, self.x_pixel_step, name="x.pixel_off"), name=f"x_row{m}.at")
            self.x_rows.append(f.element(self.ptr["x"], x_off, name=f"x_row{m}"))
            for t in tensors:
                self.offsets[t].append(offset(f, v, t, n, oh, ow, name=f"{t}_at{m}"))
            if m + 1 < k.mr:
                n, oh, ow = next_pixel(f, v["oh"], v["ow"], n, oh, ow,
                                       b.icmp_signed("<", f.i64(m), last))
        self.walk.move_to(*next_pixel(f, v["oh"], v["ow"], n, oh, ow, TRUE))

    # -- one tile: the k loop -------------------------------------------------------------
    def accumulate(self, c):
        """acc[m][j] over every tap and input channel, for the panel of channels from c."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment(f"k loop ({k.dot}): every tap and input channel, accumulated in registers")
        acc = [[f.slot(f.vector, f"acc{m}_{j}", f.vconst(0.0)) for j in range(k.nv)]
               for m in range(k.mr)]
        panel_offset = b.mul(c, self.k_depth, name="panel_offset")  # (c / NR) * K * NR
        w_start = f.element(self.ptr["w"], panel_offset)
        w_ptr = f.slot(w_start.type, "w_at", w_start)
        a_ptr = [f.slot(self.x_rows[m].type, f"a{m}_at") for m in range(k.mr)]
        step = self._pair_step if k.dot == "dpbf16" else self._fma_step
        steps = self.row_depth if k.pairs == 1 else b.udiv(self.row_depth, f.i64(k.pairs),
                                                             name="row_pairs")
        with f.loop(0, v["kh"], 1, "i") as i:
            window_row = b.mul(i, self.row_depth if k.stages_rows else v["x.row"],
                               name="window_row")
            for m in range(k.mr):
                f.set(a_ptr[m], f.element(self.x_rows[m], window_row))
            with f.loop(0, steps, 1, "kc"):
                w_at = f.get(w_ptr, "w_at")
                if self.next_panel is not None:
                    self.prefetch(f.element(w_at, self.next_panel, name="w_next"))
                step(acc, a_ptr, w_at)
                f.set(w_ptr, f.element(w_at, k.nr * k.pairs))
        return [[f.get(acc[m][j], f"acc{m}_{j}") for j in range(k.nv)] for m in range(k.mr)]

    def prefetch(self, w_next) -> None:
        """Into L2, the cache lines of one k step's weights at `w_next` (an address past the
        last panel is harmless: a prefetch never faults)."""
        f, k = self.f, self.k
        per_line = CACHE_LINE // f.bytes_of(w_next)
        for line in range(max(1, k.nr * k.pairs // per_line)):
            f.prefetch(f.element(w_next, line * per_line, name=f"w_next.line{line}"),
                       L2_LOCALITY)

    def _fma_step(self, acc, a_ptr, w_at) -> None:
        """One input channel: NV weight vectors, MR broadcasts, MR x NV multiply-adds."""
        f, k = self.f, self.k
        weights = [f.vload(f.element(w_at, j * k.lanes), align=k.lanes * f.bytes_of(w_at),
                           name=f"w{j}") for j in range(k.nv)]
        for m in range(k.mr):
            a_at = f.get(a_ptr[m], f"a{m}_at")
            a = f.splat_element(a_at, name=f"a{m}")
            for j in range(k.nv):
                f.set(acc[m][j], f.fma(a, weights[j], f.get(acc[m][j]), name=f"acc{m}_{j}"))
            f.set(a_ptr[m], f.element(a_at, 1))

    def _pair_step(self, acc, a_ptr, w_at) -> None:
        """Two input channels: NV vectors of weight pairs, MR broadcast input pairs, MR x NV
        vdpbf16ps (each lane: acc + a0 * w0 + a1 * w1). The input pair is the instruction's
        memory operand, broadcast by it ({1to16}): no broadcast of its own competes with the
        dot products for their pipes (1.25x on ResNet-164's stage-1 1 x 1 layer, Zen 4)."""
        f, b, k = self.f, self.b, self.k
        pairs = ir.VectorType(I32, k.lanes)
        weights = [b.load(b.bitcast(f.element(w_at, j * k.lanes * PAIR), pairs.as_pointer()),
                          align=k.lanes * 4, name=f"w{j}") for j in range(k.nv)]
        dot = f.intrinsic("llvm.x86.avx512bf16.dpbf16ps.512", f.vector,
                          [f.vector, pairs, pairs])
        for m in range(k.mr):
            a_at = f.get(a_ptr[m], f"a{m}_at")
            pair = b.load(b.bitcast(a_at, I32.as_pointer()), align=2, name=f"a{m}.pair")
            a = f.splat_int32(pair, name=f"a{m}")
            for j in range(k.nv):
                f.set(acc[m][j], b.call(dot, [f.get(acc[m][j]), weights[j], a],
                                        name=f"acc{m}_{j}"))
            f.set(a_ptr[m], f.element(a_at, PAIR))

    # -- one tile: epilogue and store -------------------------------------------------------
    def store_tile(self, acc, c, rows) -> None:
        f, b, k = self.f, self.b, self.k
        width = b.sub(f.args["c_end"], c, name="width")
        full = b.icmp_signed(">=", width, f.i64(k.nr), name="full_panel")
        with b.if_else(full) as (whole, partial):
            with whole:
                b.comment("epilogue and store, every channel of the panel")
                self.epilogue(acc, c, rows, None)
            with partial:
                b.comment("epilogue and store, the last channels (masked)")
                self.epilogue(acc, c, rows, width)

    def epilogue(self, acc, c, rows, width) -> None:
        b, k = self.b, self.k
        panel = self.panel_operands(c, width)
        if k.sums:
            b.comment("the panel's running block sums")
            sums = self.block_sums.open(c, panel["masks"])
        for m in range(k.mr):
            stored, valid = self.store_row(m, acc[m], c, rows, panel)
            if k.sums:
                self.add_row_sums(sums, stored, m, valid, c, panel)
                with b.if_then(b.and_(valid, self.ends_block(m)), likely=False):
                    self.block_sums.end_block(sums, c, width)
        if k.sums:
            self.block_sums.close(sums, c, panel["masks"])

    def panel_operands(self, c, width) -> dict:
        """What every row of a panel's epilogue reads alike: the lane masks of its vectors
        (none for a whole panel), a loader through them, and the per-channel operands of the
        chains and of the sums."""
        f, k = self.f, self.k
        masks = [None] * k.nv if width is None else [f.mask(j * k.lanes, width)
                                                      for j in range(k.nv)]

        def load(ptr, j, name=""):
            return load_vector(f, f.element(ptr, j * k.lanes), masks[j], name=name)

        channel = {o.role: [load(f.element(self.ptr[o.role], c), j, o.role)
                            for j in range(k.nv)]
                   for chain in k.chains for o in chain.operands if o.kind == epilogue.CHANNEL}
        against = {n: [load(f.element(self.ptr[f"sums.{n}"], c), j, n) for j in range(k.nv)]
                   for n in k._sum_operands if n != "x"}
        return dict(masks=masks, load=load, channel=channel, against=against)

    def store_row(self, m: int, acc_row, c, rows, panel):
        """Row m's vectors through each chain, stored where the row holds a pixel; the first
        output as stored (what the sums are made of) and the row's validity."""
        f, b, k = self.f, self.b, self.k
        masks, load = panel["masks"], panel["load"]

        def operand(o, j):
            if o.kind == epilogue.CHANNEL:
                return panel["channel"][o.role][j]
            if o.kind == epilogue.PIXEL:
                return load(self.pixel(o.role, m, c), j, o.role)
            return epilogue.read_operand(f, o, self.v, self.ptr, self.positions[m],
                                         b.add(c, f.i64(j * k.lanes)), masks[j])
        def row_values() -> list:
            """Each output's vectors as stored, then the first output's as read back."""
            outputs, values = [], acc_row
            for chain, out in zip(k.chains, k.outputs):
                values = [epilogue.apply_chain(f, chain, values[j], lambda o: operand(o, j),
                                               self.v, f".m{m}_{j}") for j in range(k.nv)]
                stored = [f.stored_form(value, self.ptr[out]) for value in values]
                outputs += stored
                # what the next chain and the sums are made of: the output as stored
                values = [f.read_back(value, self.ptr[out]) for value in stored]
                if out == "out":
                    stored_first = values
            return outputs + stored_first
        made = f.rounded_once(row_values)
        outputs = [made[i * k.nv:(i + 1) * k.nv] for i in range(len(k.outputs) + 1)]
        stored_first = outputs.pop()
        valid = self.row_valid(m, rows)
        with b.if_then(valid):
            # past the caches where the step streams (`Arena.streams`)
            for out, vectors in zip(k.outputs, outputs):
                for j, vector, mask in self.stores(vectors, masks):
                    put_vector(f, vector, f.element(self.pixel(out, m, c), j * k.lanes), mask,
                               self.streams)
        return stored_first, valid

    def stores(self, vectors, masks) -> list:
        """(first vector, value, mask) of each store of a row's vectors of one output: a
        whole panel's integer-rounded bfloat16 vectors two at a time, one store for both
        (LLVM packs two vectors' roundings into one register in two instructions, where it
        narrows each alone in two)."""
        f = self.f
        if masks[0] is not None or vectors[0].type.element != I16 or f.converts_bf16:
            return list(zip(range(len(vectors)), vectors, masks))
        return [(j, f.joined(vectors[j:j + 2]), None) for j in range(0, len(vectors), 2)]

    def pixel(self, tensor: str, m: int, c):
        """Where row m's pixel of `tensor` holds channel c."""
        b = self.b
        return self.f.element(self.ptr[tensor], b.add(self.offsets[tensor][m], c,
                                                      name=f"{tensor}.at{m}"),
                              name=f"{tensor}.row{m}")

    def row_valid(self, m: int, rows):
        """Whether tile row m holds an output pixel (an i1): one of the rows left."""
        return self.b.icmp_signed("<", self.f.i64(m), rows, name=f"row{m}_valid")

    def add_row_sums(self, sums, values, m, valid, c, panel) -> None:
        """Add tile row m's summands (zero for a row past the last pixel) to `sums`."""
        f, b, k = self.f, self.b, self.k
        zero = f.vconst(0.0)
        for j in range(k.nv):
            x = panel["load"](self.pixel("sums.x", m, c), j, "sums.x") if k.sum_against \
                else None
            ch = {n: vectors[j] for n, vectors in panel["against"].items()}
            first, second = sum_terms(f, k.sums, values[j], x, ch, self.sum_scalars)
            self.block_sums.add(sums, j, b.select(valid, first, zero), second)

    def ends_block(self, m: int):
        """Whether tile row m's pixel is the last of a block of sums (an i1)."""
        f, b = self.f, self.b
        done = b.sub(b.add(self.tile_start, f.i64(m + 1)), f.args["p_begin"])
        return b.icmp_unsigned("==", b.urem(done, f.i64(SUM_BLOCK)), f.i64(0),
                               name=f"row{m}_ends_block")
