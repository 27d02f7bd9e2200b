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

With `sums` (training), the kernel also makes two per-channel sums of its output over the
call's pixels, in float64 (a tile's rows in the kernel's dtype, then into float64), into slot
`p_begin / sums.chunk` of a [slot][2][sums.width] buffer: the caller cuts a step into fixed
chunks of pixels, one call each, and combines the slots in order (`reduce.SlotSum`), so the
sums do not depend on how many threads ran the calls. The sums are `reduce.ChannelSums`':
"moments" (y, y * y: a forward conv's batch statistics), or a data gradient's batch-norm
gradient sums, "bn_grad" and "bn_relu_grad" (g, g * xhat, read against the batch norm's input
`sums.x`), so the reduction reads the gradient while it is in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ..target import Target
from . import epilogue
from .emit import Function, Tiled, new_module
from .pixels import (CALL_PARAMS, TRUE, PixelWalk, load_arguments, load_vector, next_pixel,
                     offset, store_vector, stride_fields)
from .reduce import SUM_KINDS, sum_operands, sum_scalars, sum_terms
from .slots import add_f64, statistics_slot

GEOMETRY = ("cin", "kh", "kw", "stride", "oh", "ow", "x.image", "x.row", "panels_outer")


def default_tile(target: Target, dtype: str) -> tuple[int, int]:
    """(MR, NV): NV = 2 vectors of channels, as many rows as leave registers for the two
    weight vectors and one broadcast (6 on 16 registers, 14 on 32)."""
    nv = 2
    return (target.registers - nv - 1) // nv, nv


@dataclass(frozen=True)
class ConvKernel(Tiled):
    """What one compiled conv kernel computes; every size and stride is a run-time value."""
    dtype: str
    target: Target
    epilogue: tuple[str, ...] = ()
    out2: tuple[str, ...] | None = None
    mr: int = 0
    nv: int = 0
    sums: str | None = None

    def __post_init__(self):
        mr, nv = default_tile(self.target, self.dtype)
        object.__setattr__(self, "mr", self.mr or mr)
        object.__setattr__(self, "nv", self.nv or nv)
        object.__setattr__(self, "epilogue", tuple(self.epilogue))
        if self.out2 is not None:
            object.__setattr__(self, "out2", tuple(self.out2))
        for op in self.epilogue + (self.out2 or ()):
            epilogue.rule(op)
        if self.sums is not None and self.sums not in SUM_KINDS:
            raise ValueError(f"ConvKernel.sums must be one of {SUM_KINDS}, got {self.sums!r}")

    @property
    def symbol(self) -> str:
        steps = "_".join(self.epilogue) or "plain"
        if self.out2 is not None:
            steps += "__out2_" + "_".join(self.out2)
        if self.sums:
            steps += f"__sums_{self.sums}"
        return f"conv_{self.dtype}_{self.target.isa}_{self.mr}x{self.nr}_{steps}"

    @property
    def operands(self) -> list[epilogue.Operand]:
        ops = epilogue.operands(self.epilogue)
        return ops + epilogue.operands(self.out2 or (), len(self.epilogue))

    @property
    def outputs(self) -> list[str]:
        return ["out"] + (["out2"] if self.out2 is not None else [])

    @property
    def pointers(self) -> list[str]:
        """Pointer arguments, in order: input, packed weights, outputs, epilogue operands, and
        the statistics' slots."""
        return (["x", "w"] + self.outputs + [op.name for op in self.operands]
                + ([f"sums.{n}" for n in sum_operands(self.sums)] + ["sums"] if self.sums
                   else []))

    @property
    def pixel_tensors(self) -> list[str]:
        against = ["sums.x"] if self.sums and self.sums != "moments" else []
        return self.outputs + [op.name for op in self.operands if op.kind == "pixel"] + against

    @property
    def fields(self) -> list[str]:
        """The constants block, in order: geometry, each pixel tensor's strides, scalars."""
        strides = stride_fields(self.pixel_tensors)
        scalars = epilogue.scalar_names(self.epilogue)
        scalars += epilogue.scalar_names(self.out2 or (), len(self.epilogue))
        sums = ([f"sums.{n}" for n in sum_scalars(self.sums)] + ["sums.chunk", "sums.width"]
                if self.sums else [])
        return list(GEOMETRY) + strides + scalars + sums

    def ir(self) -> str:
        module = new_module(self.symbol)
        _Emitter(self, module).emit()
        return str(module)


class _Emitter:
    def __init__(self, kernel: ConvKernel, module: ir.Module):
        self.k = kernel
        target = kernel.target
        self.f = Function(module, kernel.symbol, CALL_PARAMS, kernel.dtype, kernel.lanes,
                          target.fma)
        self.b = self.f.b

    # -- arguments ----------------------------------------------------------------------
    def emit(self) -> None:
        f, b, k = self.f, self.b, self.k
        b.comment(f"{k.symbol}: {k.mr} x {k.nr} tile; fields: {', '.join(k.fields)}")
        b.comment("arguments: sizes, strides (in elements) and scalars")
        self.v, self.ptr = load_arguments(f, k.fields, k.pointers)
        self.scalars = {name: f.splat(f.from_bits(self.v[name])) for name in k.fields
                        if name.startswith("s")}
        v = self.v
        self.k_depth = b.mul(b.mul(v["kh"], v["kw"]), v["cin"], name="k_depth")
        self.x_row_step = b.mul(v["x.row"], v["stride"], name="x_row_step")
        self.x_pixel_step = b.mul(v["cin"], v["stride"], name="x_pixel_step")
        self.row_depth = b.mul(v["kw"], v["cin"], name="row_depth")
        if k.sums:
            self.sums_slot = statistics_slot(f, self.ptr["sums"], v["sums.chunk"],
                                             v["sums.width"], 2)
            self.sum_scalars = {n: f.splat(f.from_bits(v[f"sums.{n}"]))
                                for n in sum_scalars(k.sums)}
        self.tiles()
        f.finish()

    # -- the tile loop --------------------------------------------------------------------
    def tiles(self) -> None:
        """Tiles outer: a tile's input stays in L1 while every panel of weights passes. With
        `panels_outer` set, panels outer: a panel stays in cache while every tile passes (the
        layers whose weights outweigh their pixels, whose weights would otherwise stream from
        memory once per tile)."""
        f, b, k, v = self.f, self.b, self.k, self.v
        self.walk = PixelWalk(f, v["oh"], v["ow"])
        p_begin, p_end = f.args["p_begin"], f.args["p_end"]
        c_begin, c_end = f.args["c_begin"], f.args["c_end"]
        by_panel = b.icmp_signed("!=", v["panels_outer"], f.i64(0))
        with b.if_else(by_panel) as (panels_first, tiles_first):
            with panels_first:
                with f.loop(c_begin, c_end, k.nr, "c") as c:
                    self.walk.restart()
                    with f.loop(p_begin, p_end, k.mr, "p") as p:
                        rows = self.tile_rows(p)
                        self.store_tile(self.accumulate(c), c, rows)
            with tiles_first:
                with f.loop(p_begin, p_end, k.mr, "p") as p:
                    rows = self.tile_rows(p)
                    with f.loop(c_begin, c_end, k.nr, "c") as c:
                        self.store_tile(self.accumulate(c), c, rows)

    def tile_rows(self, p):
        """Rows left from p (at most MR are used) and the tile's row pointers."""
        self.b.comment(f"tile of {self.k.mr} pixels from p")
        rows = self.b.sub(self.f.args["p_end"], p, name="rows_left")
        self.row_pointers(rows)
        return rows

    def row_pointers(self, rows) -> None:
        """Per row m of the tile: the input window origin and each pixel tensor's offset.
        Rows past the last pixel repeat it. The next tile starts at the pixel after row MR-1."""
        f, b, k, v = self.f, self.b, self.k, self.v
        n, oh, ow = self.walk.position()
        last = b.sub(rows, f.i64(1))
        self.x_rows, self.offsets = [], {t: [] for t in k.pixel_tensors}
        for m in range(k.mr):
            x_off = b.add(b.add(b.mul(n, v["x.image"]), b.mul(oh, self.x_row_step)),
                          b.mul(ow, self.x_pixel_step))
            self.x_rows.append(f.element(self.ptr["x"], x_off))
            for t in k.pixel_tensors:
                self.offsets[t].append(offset(f, v, t, n, oh, ow))
            if m + 1 < k.mr:
                n, oh, ow = next_pixel(f, v["oh"], v["ow"], n, oh, ow,
                                       b.icmp_signed("<", f.i64(m), last))
        self.walk.move_to(*next_pixel(f, v["oh"], v["ow"], n, oh, ow, TRUE))

    # -- one tile: the k loop -------------------------------------------------------------
    def accumulate(self, c):
        """acc[m][j] over every tap and input channel, for the panel of channels from c."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment("k loop: every tap and input channel, accumulated in registers")
        acc = [[f.slot(f.vector, f"acc{m}_{j}", f.vconst(0.0)) for j in range(k.nv)]
               for m in range(k.mr)]
        panel_offset = b.mul(c, self.k_depth, name="panel_offset")  # (c / NR) * K * NR
        w_ptr = f.slot(f.scalar.as_pointer(), "w_at", f.element(self.ptr["w"], panel_offset))
        a_ptr = [f.slot(f.scalar.as_pointer(), f"a{m}") for m in range(k.mr)]
        with f.loop(0, v["kh"], 1, "i") as i:
            window_row = b.mul(i, v["x.row"], name="window_row")
            for m in range(k.mr):
                f.set(a_ptr[m], f.element(self.x_rows[m], window_row))
            with f.loop(0, self.row_depth, 1, "kc"):
                w_at = f.get(w_ptr)
                weights = [f.vload(f.element(w_at, j * k.lanes), align=k.lanes * f.scalar_bytes)
                           for j in range(k.nv)]
                for m in range(k.mr):
                    a_at = f.get(a_ptr[m])
                    a = f.splat(b.load(a_at))
                    for j in range(k.nv):
                        f.set(acc[m][j], f.fma(a, weights[j], f.get(acc[m][j])))
                    f.set(a_ptr[m], f.element(a_at, 1))
                f.set(w_ptr, f.element(w_at, k.nr))
        return [[f.get(acc[m][j]) for j in range(k.nv)] for m in range(k.mr)]

    # -- one tile: epilogue and store -------------------------------------------------------
    def store_tile(self, acc, c, rows) -> None:
        f, b, k = self.f, self.b, self.k
        width = b.sub(f.args["c_end"], c, name="width")
        full = b.icmp_signed(">=", width, f.i64(k.nr))
        with b.if_else(full) as (whole, partial):
            with whole:
                b.comment("epilogue, every channel of the panel")
                self.epilogue(acc, c, rows, None)
            with partial:
                b.comment("epilogue, the last channels (masked)")
                self.epilogue(acc, c, rows, width)

    def epilogue(self, acc, c, rows, width) -> None:
        f, b, k = self.f, self.b, self.k
        masks = [None] * k.nv if width is None else [f.mask(j * k.lanes, width)
                                                      for j in range(k.nv)]

        def load(ptr, j):
            return load_vector(f, f.element(ptr, j * k.lanes), masks[j])

        def store(value, ptr, j):
            store_vector(f, value, f.element(ptr, j * k.lanes), masks[j])

        channel = {op.name: [load(f.element(self.ptr[op.name], c), j) for j in range(k.nv)]
                   for op in k.operands if op.kind == "channel"}
        against = {n: [load(f.element(self.ptr[f"sums.{n}"], c), j) for j in range(k.nv)]
                   for n in sum_operands(k.sums) if n != "x"}
        firsts, seconds = [None] * k.nv, [None] * k.nv
        for m in range(k.mr):
            def pixel_ptr(t):
                return f.element(self.ptr[t], b.add(self.offsets[t][m], c))
            values = self.apply(k.epilogue, 0, acc[m], channel, pixel_ptr, load)
            outputs = [("out", values)]
            if k.out2 is not None:
                outputs.append(("out2", self.apply(k.out2, len(k.epilogue), values, channel,
                                                   pixel_ptr, load)))
            valid = b.icmp_signed("<", f.i64(m), rows)
            with b.if_then(valid):
                for name, vals in outputs:
                    base = pixel_ptr(name)
                    for j in range(k.nv):
                        store(vals[j], base, j)
            if k.sums:
                zero = f.vconst(0.0)
                for j in range(k.nv):
                    x = None if k.sums == "moments" else load(pixel_ptr("sums.x"), j)
                    ch = {n: vectors[j] for n, vectors in against.items()}
                    first, second = sum_terms(f, k.sums, values[j], x, ch, self.sum_scalars)
                    first = b.select(valid, first, zero)
                    firsts[j] = first if m == 0 else b.fadd(firsts[j], first)
                    seconds[j] = (b.fmul(first, second) if m == 0
                                  else f.fma(first, second, seconds[j]))
        if k.sums:
            b.comment("the tile's two channel sums, into float64 slots")
            for row, vectors in ((0, firsts), (1, seconds)):
                for j in range(k.nv):
                    add_f64(f, self.sums_slot, row, b.add(c, f.i64(j * k.lanes)), vectors[j],
                            None if width is None else b.sub(width, f.i64(j * k.lanes)))

    def apply(self, steps, first, values, channel, pixel_ptr, load):
        """The steps (numbered from `first`) on each vector of one tile row."""
        values = list(values)
        for index, op in enumerate(steps, start=first):
            rule = epilogue.rule(op)
            scalars = [self.scalars[f"s{index}.{name}"] for name in rule.scalars]
            for j in range(self.k.nv):
                operands = []
                for position, kind in enumerate(rule.operands):
                    name = epilogue.Operand(index, kind, position).name
                    operands.append(channel[name][j] if kind == "channel"
                                    else load(pixel_ptr(name), j))
                values[j] = rule.apply(self.f, values[j], operands, scalars)
        return values
