"""The CPU backend's tuning constants: every size a kernel, the lowering, the schedule or the
arena chooses for speed rather than for meaning, with why it is what it is.

Two sorts. The reduction chunks set a summation order (each chunk is one float64 slot, the
slots summed in order: `llvm/slots.py`), so they are fixed by the shapes alone and never
timed: results are the same bits on any thread count and any host. The rest only decide how
work is cut and in what order it passes the caches; they were measured on ResNet-164's layers
on the hosts named beside them.
"""

from __future__ import annotations

from .target import Target, cache_bytes

# -- summation order (fixed) ----------------------------------------------------------------
REDUCE_CHUNK = 2048  # pixels per slot of batch statistics and batch-norm gradient sums
WGRAD_CHUNK = 2048  # pixels per slot of a weight gradient
# Powers of two, so that the chunks of the usual maps and batches (powers of two too) divide
# evenly over 2, 4, ... threads: a chunk is one call, and the thread that takes one more than
# the others keeps them at the barrier. ResNet-164's third stage at batch 128 (8192 pixels)
# was 2.67 chunks of 3072, and its barrier waits were 40 ms a train step; 4 chunks, 7 ms
# (Zen 5).
SUM_BLOCK = 64  # pixels a sums kernel adds in the model's dtype before a float64 add
WGRAD_BLOCK = 512  # pixels a weight-gradient tile accumulates in registers before its slot
# (measured on ResNet-164's layers, Zen 3: 512 beat 64 to 256, whose blocks fit L1 but pay
# the block's overhead more often, and 1024)

# -- work cutting ---------------------------------------------------------------------------
WGRAD_GROUPS = 4  # a weight gradient's output channels in up to this many calls per chunk
# A shared step is cut into chunks of about this many FLOPs (a chunk costs a counter update
# and a kernel call, about 0.2 us), at least 2 and at most 16 per thread: the last chunk taken
# bounds how long the other threads wait at the barrier.
CHUNK_FLOPS = 2e6
CHUNKS_PER_THREAD = (2, 16)
# A depth-first segment takes enough images per call for this many output pixels (ResNet-50's
# 7 x 7 layers take 2 images, CIFAR's 8 x 8 ones 1), so late layers reuse their weights over a
# longer M.
PIXELS_PER_ITEM = 64
# Pixel-wise steps of fewer pixels per image than this split channels, not pixels, across the
# threads (a 1 x 1 map has one pixel per image).
PIXEL_SPLIT_MIN = 16


def images_per_item(output_pixels: int) -> int:
    """Images per call of a depth-first segment whose convolutions make `output_pixels` per
    image (PIXELS_PER_ITEM)."""
    return max(1, -(-PIXELS_PER_ITEM // output_pixels))


def streams(pixel_bytes: int, threads: int) -> bool:
    """Whether a step running over the whole batch stores its outputs past the caches: when
    the pixels it reads and writes outgrow the L2s of the threads that run it, its outputs
    reach their readers from memory anyway (a training step's are read again by the
    backward pass, after every later layer), and a cached store only adds the read of each
    line it fills. Measured on ResNet-164's train step at batch 128 (Zen 4, 2 MiB L2s, a 32
    MiB L3 shared with other machines' cores): every step streaming (its stage-3 layers move
    19 MiB a step) 1.11x faster than none, only the steps past the L3's size 1.05x; on Zen 3
    (512 KiB L2s) every step streaming 1.01x."""
    return pixel_bytes > cache_bytes(2) * threads


def panels_outer(weight_bytes: int, stages: bool = False) -> bool:
    """Whether a conv runs panel by panel: weights up to the size of a core's L2 stay there
    while every tile passes them (tiles outer); larger ones are run panel by panel, so each
    panel comes from memory once, not once per tile (measured on a Zen 3, whose L2 is 512 KiB:
    the turn comes at the L2's size). A conv that `stages` its tiles' rows runs tiles outer
    whatever its weights: panel by panel it would stage each tile's rows once a panel, where
    tile by tile it reads its weights from L3 again (ResNet-50's 1 x 1 layers of 512 to 2048
    channels in bfloat16, one core of a Zen 3: 48-70 GFLOP/s panels outer, 84-90 tiles outer;
    the model's batch-1 call from 1.08-1.13x float32's time to 1.03-1.04x)."""
    return weight_bytes > cache_bytes(2) and not stages


# A Winograd layer cut by output channels runs its input transform as a step of its own (once
# over the threads, then a barrier) where it has at least this many panels; with fewer, each
# thread's one or two calls transform the tiles themselves at the same time. ResNet-18's
# 14 x 14, 256-channel layers at batch 1 (8 panels) spent 0.53 ms on 2 threads transforming in
# every call, 0.35 ms staged (Zen 5).
STAGED_MIN_PANELS = 4

# A register tile's rows each need a pointer in a general-purpose register (16 on x86-64),
# whatever the vector registers allow.
MAX_TILE_ROWS = 14
MIN_TILE_ROWS = 4  # fewer rows than this cannot hide a multiply-add's latency
# A tile that would compute more than this share of rows past the end of an image's pixels
# (its last tile's empty rows) takes the most rows that divide them instead. A 7 x 7 map's 16
# Winograd tiles on 14 rows computed 28 (43% empty) and ran at 0.8x the direct kernel; on 8
# rows, 1.35x (Zen 5). A 7 x 7 map's 49 pixels on 14 rows (12.5% empty) ran no slower than
# on 7, whose tile loads more broadcasts per multiply-add.
EMPTY_ROWS = 0.25
# The k loop keeps its weight pointer, counter and bound beside the stack pointer, leaving 12
# of the 16 for row pointers: a tile of more rows reloads spilled row pointers from the stack
# every k step. That costs most where one broadcast feeds one multiply-add (one vector of
# channels), so such a tile takes at most this many rows: a 3 x 3, 16-channel layer ran at
# 141-161 GFLOP/s a thread on 14 x 16 and at 187-202 on 12 x 16, its training forms 135 and
# 119 (with their sums, forward and data gradient) against 192 and 149 (Zen 5). Wider tiles
# amortise the reloads over their vectors (14 x 32 and 12 x 32 within a few percent either
# way), so the tuner tries both.
POINTER_ROWS = 12
# An AMX conv's block (MR pixels x NV vectors of 16 channels): 2 x 2 tiles of 16 x 16
# accumulators, as oneDNN's AMX convolutions block them (the 8 tiles: 2 A, 2 B, 4 C). Fixed
# by the tile registers, so never measured.
AMX_TILE = (32, 2)


# Registers a broadcast input takes beyond the one of a plain broadcast when the tile widens it
# (a bfloat16 input on FMAs: the 16 bits broadcast, then shifted into place), so the loads
# and shifts of successive rows overlap. Measured on a 3 x 3, 64-channel layer (Zen 5): a 6 x 16
# AVX2 tile spilled an accumulator and ran at 81% of float32's 6 x 16, a 5 x 16 at 96%; on
# AVX-512, 13 x 32 at 101%, 14 x 32 at 95%.
WIDENING_REGISTERS = 2


def widens(input_type: str, compute: str, dot: str = "fma", staged: bool = False) -> bool:
    """Whether a tile widens its broadcast input in the k loop: an input stored narrower than
    the compute type, multiplied one channel at a time by FMAs (`dot`, `ConvKernel.dot`), and
    not `staged` (staged rows are in the compute type, `ConvKernel.staged_type`)."""
    return dot == "fma" and input_type != compute and not staged


def stages_windows(k: int, cin: int, lanes: int) -> bool:
    """Whether a conv whose k loop would widen its input (`widens`) stages each tile's windows
    widened instead (`ConvKernel.stages_rows`): a widening per vector of inputs once a tile,
    where the k loop paid a broadcast and a shift per multiply-add of every panel, on a tile
    two registers narrower. A 1 x 1 window always (ResNet-164 at batch 128 in bfloat16 on a
    Zen 3: 1.19x float32's time to 1.12x); a wider one where its rows are whole vectors (kw *
    cin a multiple of the `lanes`): ResNet-50's 3 x 3 stride-2 layers of 128 to 512 channels,
    one Zen 3 core, from 1.08-1.33x float32's time to 0.84-1.00x (run tile by tile,
    `panels_outer`), where its 7 x 7 first conv, a masked vector in each of its rows of 21
    inputs, went from 1.18x to 1.45x."""
    return k == 1 or (k * cin) % lanes == 0


def tile_rows(target: Target, nv: int, depth: int | None = None, widens: bool = False,
              pixels: int | None = None) -> int:
    """The rows of a tile NV vectors wide: as many as leave registers for the NV weight
    vectors and one broadcast (6 on 16 registers, 14 on 32; with `widens`,
    WIDENING_REGISTERS more for a broadcast it widens), at most MAX_TILE_ROWS, or
    POINTER_ROWS for one vector; with a weight gradient's `depth` (its rows), the most of
    those that divide it, if that is at least MIN_TILE_ROWS (a 1 x 1, 16-channel layer: 8
    rows twice, not 14 and then 2); with a conv's `pixels` an image, the same where the
    rows would leave more than EMPTY_ROWS of the tiles over them empty."""
    free = target.registers - nv - 1 - (WIDENING_REGISTERS if widens else 0)
    rows = min(free // nv, MAX_TILE_ROWS if nv > 1 else POINTER_ROWS)
    wasteful = pixels and _empty(rows, pixels) > EMPTY_ROWS
    divided = depth or (pixels if wasteful else None)
    if divided:
        divisor = max(d for d in range(1, rows + 1) if divided % d == 0)
        rows = divisor if divisor >= MIN_TILE_ROWS else rows
    return rows


def _empty(rows: int, pixels: int) -> float:
    """The share of the rows of the tiles over `pixels` that lie past them."""
    computed = -(-pixels // rows) * rows
    return (computed - pixels) / computed


def conv_tile(target: Target, dtype: str, channels: int | None = None,
              depth: int | None = None, widens: bool = False,
              pixels: int | None = None) -> tuple[int, int]:
    """(MR, NV) of the conv and weight-gradient register tiles for `channels` output channels:
    NV vectors of channels, 2 unless one vector holds them all (a 16-channel layer on
    AVX-512 would otherwise leave half of every tile masked off), and `tile_rows` rows.
    Derived from the shapes, the types and the instruction set alone; the tuner may measure
    others (`autotune.candidates`), and no tile changes a number."""
    nv = 1 if channels is not None and channels <= target.lanes(dtype) else 2
    return tile_rows(target, nv, depth, widens, pixels), nv
