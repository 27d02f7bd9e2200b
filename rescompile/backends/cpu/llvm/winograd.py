"""The Winograd convolution micro-kernel: a stride-1 3 x 3 convolution as F(2 x 2, 3 x 3)
tiles (`../winograd.py` has the algorithm, its matrices and which layers take it).

Design note
-----------
The call contract is the direct kernel's (`conv.py`), over a grid of tiles instead of pixels:
a call computes tiles [p_begin, p_end) (2 x 2 output pixels each, `tiles_h` x `tiles_w` an
image, counted over every image of the call) for output channels [c_begin, c_end). A register
tile is MR tiles by NR channels, and each thread's scratch holds what passes between the
three stages of one register tile in L1 and L2, never in memory-sized buffers:

    for each MR tiles:
        input transform   B^T d B of each tile's 4 x 4 window (x points at the window's
                          top-left corner: the zero border is the caller's), a vector of
                          input channels at a time, into inputs[point][row][cin]
        for each panel of NR channels:
            products      for each of the 16 points: acc[MR][NV] = inputs[point] times the
                          point's transformed weights ([panel][point][cin][nr]), the direct
                          kernel's k loop over cin (`dot`: fused multiply-adds, or vdpbf16ps
                          on pairs of channels, the weights in VNNI-2, [panel][point][cin /
                          2][nr][2]); stored to products[point][row][nr]
            output        A^T M A of each tile's 16 products: its 2 x 2 output pixels, each
                          through the epilogue and stored, as the direct kernel stores a row

A layer cut by output channels into many panels (`tuning.STAGED_MIN_PANELS`: weights that
outweigh the input, each call a panel or two over every tile) would transform every tile in
every call; there the input transform is a kernel of its own (`WinogradInputKernel`), run
once over the threads into a tensor of 16 rows (the points) of tiles, and a `staged` kernel
reads its rows from that tensor instead: the same values, so the same bits.

The transformed inputs are held in the compute type for fused multiply-adds, and as
bfloat16 for vdpbf16ps (`transformed_type`), which multiplies bfloat16 pairs: a bfloat16
model on AVX512-BF16 rounds them, as it rounds the transformed weights, where the direct
kernel's inputs and weights are stored values already (`../winograd.py` has what that costs).

An odd map's last tiles overhang it: their windows read one more row and column of zero
border (`winograd.window_pads`) and the outputs past the map are not stored. The transforms
are generated from their matrices: each output of one is a sum over the matrix row's
non-zero entries, in the row's order. A tile's arithmetic does not depend on the call, its
rows or its panel, so every output is the same bits whichever thread computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from ..target import DTYPE_BYTES, Target
from ..winograd import INPUT_TRANSFORM, OUTPUT_TRANSFORM, POINTS, TILE, WINDOW
from . import abi
from .conv import ConvEmitter, ConvKernel
from .emit import BF16, MEMORY_TYPES, Vectors, new_module
from .pixels import TRUE, PixelWalk, fence_streams, next_pixel, offset, streaming

GEOMETRY = abi.sizes("cin", "oh", "ow", "tiles_h", "tiles_w") + abi.placed("streaming")


def combine(f, coefficients, values, name: str):
    """sum(c * value) over the non-zero coefficients, a positive one first (so no negation)."""
    terms = sorted(((c, v) for c, v in zip(coefficients, values) if c), key=lambda t: t[0] < 0)
    total = None
    for c, value in terms:
        if abs(c) != 1:
            value = f.b.fmul(value, f.vconst(abs(c)))
        if total is None:
            total = value
        else:
            total = (f.b.fadd if c > 0 else f.b.fsub)(total, value)
    total.name = name
    return total


def transform_window(f, load, store, name: str) -> None:
    """B^T d B of one tile's 4 x 4 window, a vector of channels: load(i, j) reads the window's
    input (i, j), store(point, value) takes each of the 16 transformed values."""
    window = [[load(i, j) for j in range(WINDOW)] for i in range(WINDOW)]
    columns = [[combine(f, INPUT_TRANSFORM[a], [row[j] for row in window], f"t{name}_{a}{j}")
                for j in range(WINDOW)] for a in range(WINDOW)]
    for a, c in product(range(WINDOW), repeat=2):
        store(a * WINDOW + c, combine(f, INPUT_TRANSFORM[c], columns[a], f"v{name}_{a}{c}"))


def window_offsets(f, v: dict) -> list:
    """The element offsets of a tile's 4 x 4 window from its origin in x (`v`: the kernel's
    fields), [i][j] for window row i and column j."""
    b = f.b
    return [[b.add(b.mul(f.i64(i), v["x.row"]), b.mul(f.i64(j), v["x.pixel"]),
                   name=f"window{i}{j}") for j in range(WINDOW)] for i in range(WINDOW)]


@dataclass(frozen=True)
class WinogradInputKernel(Vectors):
    """The input transform alone, for a `staged` Winograd kernel: each tile's 16 transformed
    vectors of channels into `out`, an image of 16 rows (the points) of tiles_h * tiles_w
    pixels (the tiles) of cin channels. A call covers tiles [p_begin, p_end)."""
    dtype: str
    target: Target
    storage: tuple[tuple[str, str], ...] = field(default=(), kw_only=True)

    @property
    def symbol(self) -> str:
        return f"winograd_input_{self.dtype}_{self.target.isa}{self.storage_tag()}"

    @property
    def signature(self) -> abi.Signature:
        return (abi.sizes("cin", "tiles_h", "tiles_w") + abi.strides("x", "out")
                + abi.stored(self, "x") + abi.stored(self, "out", written=True))

    def ir(self) -> str:
        module = new_module(self.symbol)
        f = abi.new_function(module, self.symbol, self.dtype, self.lanes, self.target)
        b = f.b
        b.comment(f"{self.symbol}: B^T d B of each tile's 4 x 4 window, into 16 rows of tiles")
        v, ptr = abi.load_arguments(f, self.signature)
        per_image = b.mul(v["tiles_h"], v["tiles_w"], name="tiles_per_image")
        window = window_offsets(f, v)
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p") as p:
            n, t = b.udiv(p, per_image, name="n"), b.urem(p, per_image, name="tile")
            ty, tx = b.udiv(t, v["tiles_w"], name="ty"), b.urem(t, v["tiles_w"], name="tx")
            origin = offset(f, v, "x", n, b.mul(ty, f.i64(TILE)), b.mul(tx, f.i64(TILE)),
                            name="window")
            out = b.add(b.mul(n, v["out.image"]), b.mul(t, v["out.pixel"]), name="out.tile")
            with f.loop(0, v["cin"], self.lanes, "ci") as ci:
                def load(i, j):
                    at = b.add(window[i][j], b.add(origin, ci))
                    return f.vload(f.element(ptr["x"], at), name=f"d{i}{j}")

                def store(point, value):
                    at = b.add(b.add(out, b.mul(f.i64(point), v["out.row"])), ci)
                    f.vstore(value, f.element(ptr["out"], at))
                transform_window(f, load, store, "")
        f.finish()
        return str(module)


@dataclass(frozen=True)
class WinogradKernel(ConvKernel):
    """What one compiled Winograd kernel computes: MR tiles by NR channels, with the direct
    kernel's epilogue chains; every size and stride is a run-time value. `staged`: x is the
    transformed input (`WinogradInputKernel`'s), not the input."""
    staged: bool = field(default=False, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.sums is not None:
            raise ValueError(f"{self.symbol}: Winograd tiles make no sums")

    @property
    def symbol(self) -> str:
        staged = "_staged" if self.staged else ""
        return (f"winograd{staged}_{self.dtype}_{self.target.isa}{self.dot_tag()}_{self.mr}x"
                f"{self.nr}_{self.chain_name('plain')}{self.storage_tag()}")

    @property
    def transformed_type(self) -> str:
        """The type the products read the transformed inputs in: bfloat16 pairs for vdpbf16ps,
        else the compute type."""
        return BF16 if self.dot == "dpbf16" else self.dtype

    @property
    def signature(self) -> abi.Signature:
        """Geometry, the direct kernel's tensors (`ConvKernel.tensors_signature`: x the
        window origin or the staged input, the weights transformed), and the thread's
        scratch."""
        return GEOMETRY + self.tensors_signature() + abi.pointers(self.dtype, "scratch")

    def scratch_for(self, fields: dict, channels: int = 0) -> int:
        return self.scratch_bytes(fields["cin"])

    def scratch_bytes(self, cin: int, channels: int = 0) -> int:
        """The per-thread scratch this tile needs on `cin` input channels: the products of MR
        tiles by a panel, and unless `staged` the transformed inputs of those tiles."""
        inputs = 0 if self.staged else cin * DTYPE_BYTES[self.transformed_type]
        return POINTS * self.mr * (self.nr * DTYPE_BYTES[self.dtype] + inputs)

    def ir(self) -> str:
        self.check_types()
        module = new_module(self.symbol)
        WinogradEmitter(self, module).emit()
        return str(module)


class WinogradEmitter(ConvEmitter):
    def emit(self) -> None:
        f, b, k = self.f, self.b, self.k
        b.comment(f"{k.symbol}: Winograd F(2x2, 3x3), {k.mr} tiles of 2 x 2 output pixels "
                  f"by {k.nr} channels")
        b.comment("arguments: sizes, strides (in elements) and scalars; pointers by role")
        self.v, self.ptr = abi.load_arguments(f, k.signature)
        self.flush_if_rounding()
        self.check_rounding_by_call()
        self.streams = streaming(f, self.v)
        v = self.v
        self.products = self.ptr["scratch"]
        if k.staged:
            b.comment("scratch: products[point][row][nr]")
        else:
            b.comment(f"scratch: products[point][row][nr], then inputs[point][row][cin] "
                      f"({k.transformed_type})")
            after = f.element(self.products, f.i64(POINTS * k.mr * k.nr), name="after")
            self.inputs = b.bitcast(after, MEMORY_TYPES[k.transformed_type].as_pointer(),
                                    name="inputs")
            self.window = window_offsets(f, v)
        self.tiles()
        fence_streams(f, self.streams)
        self.remake_if_suspect()
        f.finish()

    def tiles(self) -> None:
        f, b, k, v = self.f, self.b, self.k, self.v
        self.walk = PixelWalk(f, v["tiles_h"], v["tiles_w"])
        p_end = f.args["p_end"]
        with f.loop(f.args["p_begin"], p_end, k.mr, "p") as p:
            rows = b.sub(p_end, p, name="rows_left")
            self.tile_origins(rows)
            self.output_pixels()
            if not k.staged:
                self.transform_inputs()
            with f.loop(f.args["c_begin"], f.args["c_end"], k.nr, "c") as c:
                self.multiply(c)
                self.store_tile(None, c, rows)

    def tile_origins(self, rows) -> None:
        """Per row m: its tile's (n, tile row, tile column) and where x holds it: its window's
        origin, or (staged) its transformed input's first point. Rows past the last tile
        repeat it; the next register tile starts at the tile after row MR-1."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment(f"{k.mr} tiles from p: where x holds them")
        n, ty, tx = self.walk.position()
        last = b.sub(rows, f.i64(1), name="last_row")
        self.tile_at, self.x_rows = [], []
        for m in range(k.mr):
            self.tile_at.append((n, ty, tx))
            if k.staged:
                tile = b.add(b.mul(ty, v["tiles_w"]), tx, name=f"tile{m}")
                origin = b.add(b.mul(n, v["x.image"]), b.mul(tile, v["x.pixel"]),
                               name=f"x_row{m}.at")
            else:
                origin = offset(f, v, "x", n, b.mul(ty, f.i64(TILE)), b.mul(tx, f.i64(TILE)),
                                name=f"x_row{m}.at")
            self.x_rows.append(f.element(self.ptr["x"], origin, name=f"x_row{m}"))
            if m + 1 < k.mr:
                n, ty, tx = next_pixel(f, v["tiles_h"], v["tiles_w"], n, ty, tx,
                                       b.icmp_signed("<", f.i64(m), last))
        self.walk.move_to(*next_pixel(f, v["tiles_h"], v["tiles_w"], n, ty, tx, TRUE))

    def transform_inputs(self) -> None:
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment("input transform: B^T d B of each tile's window, a vector of channels at a "
                  "time")
        with f.loop(0, v["cin"], k.lanes, "ci") as ci:
            for m in range(k.mr):
                def load(i, j, m=m):
                    return f.vload(f.element(self.x_rows[m], b.add(self.window[i][j], ci)),
                                   name=f"d{m}_{i}{j}")

                def transformed(m=m) -> list:
                    """The window's 16 transformed vectors, as the scratch holds them."""
                    points = [None] * POINTS
                    transform_window(f, load, lambda point, value: points.__setitem__(
                        point, f.stored_form(value, self.inputs)), str(m))
                    return points
                for point, value in enumerate(f.rounded_once(transformed)):
                    row = b.mul(f.i64(point * k.mr + m), v["cin"])
                    f.vstore(value, f.element(self.inputs, b.add(row, ci)))

    def multiply(self, c) -> None:
        """products[point] = inputs[point] x the point's weights, for the panel from c."""
        f, b, k, v = self.f, self.b, self.k, self.v
        b.comment("the 16 points' products: each a k loop over the input channels")
        cin = v["cin"]
        panel = b.mul(c, b.mul(f.i64(POINTS), cin), name="panel_offset")  # (c / NR) 16 cin NR
        with f.loop(0, POINTS, 1, "point") as point:
            point_offset = b.mul(point, b.mul(cin, f.i64(k.nr)), name="point_offset")
            w_start = f.element(self.ptr["w"], b.add(panel, point_offset))
            w_ptr = f.slot(w_start.type, "w_at", w_start)
            first = b.mul(point, f.i64(k.mr), name="point_rows")
            starts = [self.point_row(point, first, m) for m in range(k.mr)]
            a_ptr = [f.slot(start.type, f"a{m}_at", start) for m, start in enumerate(starts)]
            acc = [[f.slot(f.vector, f"acc{m}_{j}", f.vconst(0.0)) for j in range(k.nv)]
                   for m in range(k.mr)]
            step = self._pair_step if k.dot == "dpbf16" else self._fma_step
            with f.loop(0, cin, k.pairs, "kc"):
                w_at = f.get(w_ptr, "w_at")
                step(acc, a_ptr, w_at)
                f.set(w_ptr, f.element(w_at, k.nr * k.pairs))
            for m, j in product(range(k.mr), range(k.nv)):
                at = b.add(b.mul(b.add(first, f.i64(m)), f.i64(k.nr)), f.i64(j * k.lanes))
                f.vstore(f.get(acc[m][j]), f.element(self.products, at))

    def point_row(self, point, first, m: int):
        """Where row m's transformed inputs of `point` start: in x (staged), or in the
        scratch's inputs[point][row]."""
        f, b, v = self.f, self.b, self.v
        if self.k.staged:
            return f.element(self.x_rows[m], b.mul(point, v["x.row"]), name=f"a{m}_start")
        return f.element(self.inputs, b.mul(b.add(first, f.i64(m)), v["cin"]),
                         name=f"a{m}_start")

    def epilogue(self, acc, c, rows, width) -> None:
        """Row by row: the tile's 2 x 2 output pixels, A^T M A of its products, each through
        the epilogue and stored as the direct kernel stores a row (`ConvEmitter.store_row`)."""
        b, k = self.b, self.k
        panel = self.panel_operands(c, width)
        for m in range(k.mr):
            b.comment(f"output transform and epilogue: row {m}'s 2 x 2 pixels")
            for (a, bb), values in self.output_row(m).items():
                self.positions, self.offsets, self.inside = self.pixels_at[a, bb]
                self.store_row(m, values, c, rows, panel)

    def output_pixels(self) -> None:
        """For each pixel (a, bb) of a tile: each row's position, tensor offsets and whether
        it lies inside the map (an odd map's last tiles overhang it)."""
        f, b, k, v = self.f, self.b, self.k, self.v
        tensors = k.outputs + [r for chain in k.chains for r in chain.pixel_roles]
        self.pixels_at = {}
        for a, bb in product(range(TILE), repeat=2):
            positions, offsets, inside = [], {t: [] for t in tensors}, []
            for m, (n, ty, tx) in enumerate(self.tile_at):
                oh = b.add(b.mul(ty, f.i64(TILE)), f.i64(a), name=f"oh{m}_{a}{bb}")
                ow = b.add(b.mul(tx, f.i64(TILE)), f.i64(bb), name=f"ow{m}_{a}{bb}")
                positions.append((n, oh, ow))
                for t in tensors:
                    offsets[t].append(offset(f, v, t, n, oh, ow, name=f"{t}_at{m}_{a}{bb}"))
                inside.append(b.and_(b.icmp_signed("<", oh, v["oh"]),
                                     b.icmp_signed("<", ow, v["ow"]), name=f"inside{m}_{a}{bb}"))
            self.pixels_at[a, bb] = positions, offsets, inside

    def output_row(self, m: int) -> dict:
        """Row m's vectors of each output pixel (a, bb): A^T M A of its 16 products, the
        columns first."""
        f, k = self.f, self.k
        pixels = {pixel: [] for pixel in product(range(TILE), repeat=2)}
        for j in range(k.nv):
            products = [[f.vload(f.element(self.products,
                                           ((p * WINDOW + q) * k.mr + m) * k.nr + j * k.lanes),
                                 name=f"m{m}_{p}{q}_{j}") for q in range(WINDOW)]
                        for p in range(WINDOW)]
            columns = [[combine(f, OUTPUT_TRANSFORM[bb], products[p],
                                f"s{m}_{p}{bb}_{j}") for bb in range(TILE)]
                       for p in range(WINDOW)]
            for a, bb in pixels:
                column = [sums[bb] for sums in columns]
                pixels[a, bb].append(combine(f, OUTPUT_TRANSFORM[a], column, f"y{m}_{a}{bb}_{j}"))
        return pixels

    def row_valid(self, m: int, rows):
        return self.b.and_(super().row_valid(m, rows), self.inside[m], name=f"row{m}_stored")
