"""The convolution on AMX tiles (`tdpbf16ps`): the conv kernel (`conv.py`) with its k loop on
tiles and its epilogue on the accumulators the tiles store.

Design note
-----------
A call computes the same output pixels and channels as the register-tile kernel, in blocks of
32 pixels by 32 channels (`tuning.AMX_TILE`), the eight tile registers blocked 2 x 2 as
oneDNN's AMX convolutions block them:

    tmm0, tmm1   A: 16 pixels x 32 bfloat16 of k each (one 64-byte row a pixel)
    tmm2, tmm3   B: 16 pairs of k x 16 output channels x 2 (VNNI-2: a pair a 32-bit element)
    tmm4..tmm7   C: 16 pixels x 16 channels of float32, C[a][b] = tmm(4 + 2a + b)

    for each block of 32 pixels, each panel of 32 channels:
        C = 0
        for each window row i, each step of 32 along the row's kw * cin inputs:
            stage A: each pixel's 32 inputs from its window row into a 32 x 64-byte buffer
                     (masked past the row's end: zeros, whose weights are zero too)
            A0, A1 <- the buffer; B0, B1 <- the packed weights ([kh][R'/2][32][2] a panel,
                     `weights.py`: each window row padded to R', a multiple of 32)
            C[a][b] += A[a] . B[b]             (4 tdpbf16ps)
        store C to a 32 x 32 float32 buffer; the float32 epilogue on its rows, as the
        register-tile kernel applies it, then the one store (and the sums)

Staging A keeps every stride, padding and window size the register tile handles (rows of a
tile need not be evenly spaced in memory, which tileloadd requires). The process asks Linux
for the tile state once before any of this runs (`cpu/amx.py`); the tile configuration (8
tiles of 16 rows of 64 bytes) is loaded once per call and released at its end.

`AmxConvKernel(emulated=True)` is the same kernel with every tile instruction emulated in
vector code (tdpbf16ps as 16 x 16 vdpbf16ps, which computes the same pairs), so the staging,
the weight layout and the epilogue run, and are tested, on a host with AVX512-BF16 but no AMX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from llvmlite import ir

from .conv import PAIR, ConvEmitter, ConvKernel
from .emit import I8, I16, I32, VOID, new_module
TILE_ROWS = 16
TILE_BYTES = 64  # a tile row
DEPTH = TILE_BYTES // 2  # bfloat16 of k per A row (weights.AMX_DEPTH)
CHANNELS = TILE_BYTES // 4  # output channels of a B or C tile
A_TILES, B_TILES, C_TILES = (0, 1), (2, 3), ((4, 5), (6, 7))


@dataclass(frozen=True)
class AmxConvKernel(ConvKernel):
    """The conv kernel on AMX tiles; `emulated`: the tile instructions in vector code."""
    dot: str = field(default="amx", kw_only=True)
    emulated: bool = field(default=False, kw_only=True)
    DOTS: ClassVar[tuple[str, ...]] = ("amx",)

    @property
    def symbol(self) -> str:
        return super().symbol + ("_emulated" if self.emulated else "")

    @property
    def extension(self) -> str:
        return "avx512_bf16" if self.emulated else "amx_bf16"

    def ir(self) -> str:
        self.check_types()
        module = new_module(self.symbol)
        AmxEmitter(self, module).emit()
        return str(module)


class AmxEmitter(ConvEmitter):
    """The conv emitter with the k loop on tiles (or their emulation)."""

    def __init__(self, kernel: AmxConvKernel, module: ir.Module, exact: bool = False):
        super().__init__(kernel, module, exact)
        self.f.require(kernel.target.features_for(kernel.extension))
        self.tiles_ops = (_EmulatedTiles if kernel.emulated else Tiles)(self.f)

    def emit(self) -> None:
        b = self.b
        b.comment("tile configuration: 8 tiles of 16 rows of 64 bytes, loaded once per call")
        self.a_stage = self.f.slot(ir.ArrayType(I16, 2 * TILE_ROWS * DEPTH), "a_stage")
        self.c_store = self.f.slot(ir.ArrayType(ir.FloatType(), 4 * TILE_ROWS * TILE_ROWS),
                                   "c_store")
        self.tiles_ops.configure()
        super().emit()

    def finish_tiles(self) -> None:
        self.tiles_ops.release()

    def twin_kernel(self) -> AmxConvKernel:
        """The AMX tiles fix the tile."""
        return self.k

    def accumulate(self, c):
        """The 32 x 32 block of channels from c on the tiles, returned as acc[m][j] vectors
        of the stored accumulators."""
        f, b, k, v, t = self.f, self.b, self.k, self.v, self.tiles_ops
        b.comment("k loop on tiles: C[a][b] += A[a] . B[b] over every tap and input channel")
        row_pad = b.mul(b.udiv(b.add(self.row_depth, f.i64(DEPTH - 1)), f.i64(DEPTH)),
                        f.i64(DEPTH), name="row_depth_padded")
        panel_offset = b.mul(c, b.mul(v["kh"], row_pad), name="panel_offset")
        w_start = f.element(self.ptr["w"], panel_offset)
        w_ptr = f.slot(w_start.type, "w_at", w_start)
        for tile in (*C_TILES[0], *C_TILES[1]):
            t.zero(tile)
        stage = b.bitcast(self.a_stage, I16.as_pointer(), name="a_stage_at")
        b_stride = f.i64(k.nr * PAIR * 2)  # bytes between B rows: a pair for every channel
        with f.loop(0, v["kh"], 1, "i") as i:
            window_row = b.mul(i, v["x.row"], name="window_row")
            with f.loop(0, self.row_depth, DEPTH, "kk") as kk:
                left = b.sub(self.row_depth, kk, name="inputs_left")
                self.stage_a(stage, b.add(window_row, kk), left)
                w_at = f.get(w_ptr, "w_at")
                for a, tile in enumerate(A_TILES):
                    t.load(tile, f.element(stage, a * TILE_ROWS * DEPTH), f.i64(TILE_BYTES))
                for j, tile in enumerate(B_TILES):
                    t.load(tile, f.element(w_at, j * CHANNELS * PAIR), b_stride)
                for a, row in enumerate(C_TILES):
                    for j, tile in enumerate(row):
                        t.dot(tile, A_TILES[a], B_TILES[j])
                f.set(w_ptr, f.element(w_at, (DEPTH // PAIR) * k.nr * PAIR))
        b.comment("the accumulators to memory: the epilogue reads them as vectors")
        store = b.bitcast(self.c_store, ir.FloatType().as_pointer(), name="c_store_at")
        for a, row in enumerate(C_TILES):
            for j, tile in enumerate(row):
                t.store(tile, f.element(store, a * TILE_ROWS * k.nr + j * CHANNELS),
                        f.i64(k.nr * 4))
        return [[f.vload(f.element(store, m * k.nr + j * k.lanes), name=f"acc{m}_{j}")
                 for j in range(k.nv)] for m in range(k.mr)]

    def stage_a(self, stage, offset, left) -> None:
        """Each tile row's DEPTH inputs from `offset` past its window origin into its row of
        the A buffer; lanes at or past `left` (the window row's end) zero, not read."""
        f, b = self.f, self.b
        vec = ir.VectorType(I16, DEPTH)
        lanes = ir.Constant(ir.VectorType(I32, DEPTH), list(range(DEPTH)))
        width = b.trunc(left, I32)
        mask = b.icmp_signed("<", lanes, f.splat_as(width, lanes.type, "inputs_left.lanes"),
                             name="inputs_mask")
        load = f.intrinsic(f"llvm.masked.load.v{DEPTH}i16.p0", vec,
                           [vec.as_pointer(), I32, mask.type, vec])
        for m in range(self.k.mr):
            src = b.bitcast(f.element(self.x_rows[m], offset), vec.as_pointer())
            row = b.call(load, [src, ir.Constant(I32, 2), mask, ir.Constant(vec, None)],
                         name=f"a_row{m}")
            dst = b.bitcast(f.element(stage, m * DEPTH), vec.as_pointer())
            b.store(row, dst, align=2)


class Tiles:
    """The AMX instructions, on tile registers named by number."""

    def __init__(self, f):
        self.f, self.b = f, f.b

    def _call(self, name, args, ret=VOID):
        fn = self.f.intrinsic(f"llvm.x86.{name}", ret, [a.type for a in args])
        return self.b.call(fn, args)

    def configure(self) -> None:
        f, b = self.f, self.b
        config = f.slot(ir.ArrayType(I8, 64), "tile_config")
        at = b.bitcast(config, I8.as_pointer(), name="tile_config_at")
        for byte in range(64):
            b.store(ir.Constant(I8, 0), b.gep(at, [f.i64(byte)]))
        b.store(ir.Constant(I8, 1), at)  # palette 1
        for tile in range(8):
            colsb = b.bitcast(b.gep(at, [f.i64(16 + 2 * tile)]), I16.as_pointer())
            b.store(ir.Constant(I16, TILE_BYTES), colsb)
            b.store(ir.Constant(I8, TILE_ROWS), b.gep(at, [f.i64(48 + tile)]))
        self._call("ldtilecfg", [at])

    def release(self) -> None:
        self._call("tilerelease", [])

    def zero(self, tile: int) -> None:
        self._call("tilezero", [ir.Constant(I8, tile)])

    def load(self, tile: int, ptr, stride) -> None:
        at = self.b.bitcast(ptr, I8.as_pointer())
        self._call("tileloadd64", [ir.Constant(I8, tile), at, stride])

    def store(self, tile: int, ptr, stride) -> None:
        at = self.b.bitcast(ptr, I8.as_pointer())
        self._call("tilestored64", [ir.Constant(I8, tile), at, stride])

    def dot(self, c: int, a: int, b: int) -> None:
        self._call("tdpbf16ps", [ir.Constant(I8, c), ir.Constant(I8, a), ir.Constant(I8, b)])


class _EmulatedTiles:
    """The same operations on 8 tiles of 16 x 64 bytes in memory, tdpbf16ps as vdpbf16ps."""

    def __init__(self, f):
        self.f, self.b = f, f.b

    def configure(self) -> None:
        self.memory = self.f.slot(ir.ArrayType(I8, 8 * TILE_ROWS * TILE_BYTES), "tiles")

    def release(self) -> None:
        pass

    def _row(self, tile: int, row, typ):
        """Row `row` (an int or an i64) of a tile as a vector of 16 `typ` (I32 or float)."""
        b, f = self.b, self.f
        row = f.i64(row) if isinstance(row, int) else row
        at = b.gep(b.bitcast(self.memory, I8.as_pointer()),
                   [b.add(f.i64(tile * TILE_ROWS * TILE_BYTES), b.mul(row, f.i64(TILE_BYTES)))])
        return b.bitcast(at, ir.VectorType(typ, TILE_BYTES // 4).as_pointer())  # 32-bit lanes

    def zero(self, tile: int) -> None:
        vec = ir.VectorType(I32, 16)
        for row in range(TILE_ROWS):
            self.b.store(ir.Constant(vec, None), self._row(tile, row, I32), align=4)

    def _copy(self, tile: int, ptr, stride, into_tile: bool) -> None:
        b, f = self.b, self.f
        base = b.bitcast(ptr, I8.as_pointer())
        for row in range(TILE_ROWS):
            there = b.bitcast(b.gep(base, [b.mul(f.i64(row), stride)]),
                              ir.VectorType(I32, 16).as_pointer())
            here = self._row(tile, row, I32)
            src, dst = (there, here) if into_tile else (here, there)
            b.store(b.load(src, align=1), dst, align=1)

    def load(self, tile: int, ptr, stride) -> None:
        self._copy(tile, ptr, stride, True)

    def store(self, tile: int, ptr, stride) -> None:
        self._copy(tile, ptr, stride, False)

    def dot(self, c: int, a: int, b_tile: int) -> None:
        """C[m] += sum over the 16 pairs k of A[m][pair k] * B[k], lane by lane."""
        f, b = self.f, self.b
        pairs = ir.VectorType(I32, 16)
        dot = f.intrinsic("llvm.x86.avx512bf16.dpbf16ps.512", f.vector, [f.vector, pairs, pairs])
        with f.loop(0, TILE_ROWS, 1, "emulated_m") as m:
            acc = b.load(self._row(c, m, ir.FloatType()), align=4)
            a_row = b.load(self._row(a, m, I32), align=4)
            for k in range(TILE_ROWS):
                pair = b.extract_element(a_row, ir.Constant(I32, k))
                acc = b.call(dot, [acc, f.splat_int32(pair), b.load(self._row(b_tile, k, I32),
                                                                    align=4)])
            b.store(acc, self._row(c, m, ir.FloatType()), align=4)

