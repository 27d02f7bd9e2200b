"""Generate fused NHWC convolution kernels (forward, grad-input, grad-filter) for Numba.

Design note
-----------
One ``ConvSig`` becomes one self-contained ``@numba.njit(cache=True)`` function,
written as readable Python source; ``kernel_cache.compile_source`` imports it
from a file so Numba caches the machine code.  Shapes (H, W, C, k, stride,
pads) are baked in as literals; the batch size N comes from the arrays.  The
arithmetic is OpenBLAS GEMM called from njit (``blas.gemm``); the generated
loops only move data and apply the epilogue.

Layouts: x ``[N, H, W, cin]``, w ``[k, k, cin, cout]`` (HWIO, which flattens
to the row-major ``[k*k*cin, cout]`` GEMM operand), out ``[N, OH, OW, cout]``.
All arrays must be C-contiguous (the kernels use flat views).

Strategies (``ConvSig.strategy``; "auto" picks direct where it applies, else
shifted for stride 1 when the padded grid is mostly real output, else im2col):

* ``direct`` — 1×1, stride 1, no padding: x is already the ``[N*H*W, cin]``
  GEMM operand.  GEMM over chunks of rows straight into ``out``, then the
  epilogue on that chunk while it is in cache.
* ``shifted`` — stride 1, any k: copy each image into a zero-bordered padded
  buffer ``[HP, WP, cin]`` (no copy without padding) and compute the output
  over the padded row width: output row ``q = oh*WP + ow'`` reads input row
  ``q + i*WP + j`` for tap (i, j), so each tap is one GEMM on a contiguous
  shifted view, accumulated with beta = 1 (k*k GEMMs, no im2col).  The
  ``k-1`` junk columns per row are skipped by the epilogue.  Small images are
  stacked (several padded images in one buffer, one GEMM per tap over all of
  them; the junk rows between images are skipped too); large ones are split
  into balanced chunks of output rows.
* ``im2col`` — any stride: gather k*k*cin patches for a chunk of output rows
  into a small buffer, one GEMM with K = k*k*cin, epilogue.  Used for strided
  k×k and for strided 1×1 (where the "patch" is a strided row gather).

Measured here (2026-11, OpenBLAS Haswell kernels, serial kernel + 1 BLAS
thread, batch 32, 3×3 with BN-ReLU epilogue, CPU time per call, shared and
loaded machine, two runs agreeing within 10%):

    shape        shifted  im2col   ratio of useful outputs in the padded grid
    32×32×16     3.6 ms   4.6-4.9  0.89
    16×16×32     2.8 ms   3.1-3.3  0.79
    8×8×64       3.1 ms   2.9      0.64

So shifted wins where little of the padded grid is junk, im2col (one GEMM with
K = 9*cin, which OpenBLAS runs better than 9 GEMMs with K = cin) on small
images: the rule is ``SHIFTED_MIN_USEFUL``.  OpenBLAS itself is the limit at
these widths: a 1088×16×16 GEMM runs at 35 GFLOP/s per core, 1000×64×64 at 83.

Backward kernels mirror this: grad_input is ``dy @ W^T`` scattered back
(shifted GEMMs into a padded dx buffer for stride 1, col2im for stride > 1);
grad_filter is ``patches^T @ dy`` accumulated per thread and reduced at the end.

Threads (the scheme): BLAS always runs on 1 thread (``blas.set_blas_threads(1)``
once, before the first kernel; it limits NumPy's and SciPy's OpenBLAS copies);
the kernels own the cores.  ``parallel=True`` kernels split the batch into
``groups`` contiguous ranges of images (row chunks for ``direct``) over
``prange``; use them for batch >= 2, and the ``parallel=False`` variant for
batch 1 (a prange launch cost about 0.1 ms here, more than a whole batch-1
layer).  Run with the ``workqueue`` threading layer (NUMBA-NOTES: omp threads
and OpenBLAS threads fight on 2 cores).  Why: serial kernels with 2 BLAS
threads won some stage-2/3 1×1 layers at batch 128 when the shared machine
was lightly loaded (3.1 vs 7.4 ms at load ~2) and lost stage 1, but collapsed
under load (7 ms -> 490 ms for one layer at load 5-7: OpenBLAS's spinning
threads), while prange + 1 BLAS thread degraded gracefully; NUMBA-NOTES'
whole-unit measurement on a quiet machine chose the same scheme.  Not yet
re-measured on a quiet machine: rerun benchmarks/kernels/bench_conv.py.

Epilogue steps (forward only), applied in the given order to the accumulator v
per output channel c: ``("bias",)`` v += bias[c]; ``("affine",)`` v = v*scale[c]
+ shift[c]; ``("relu", alpha)`` v = v if v >= 0 else alpha*v; ``("add",)``
v += residual[n, h, w, c].  With ``has_out2``: out2 = relu(out*scale2[c] +
shift2[c], alpha2).  The chain is generated literally: no runtime branching.
"""

import contextlib
import hashlib
import math
from dataclasses import dataclass

OPS = ("forward", "grad_input", "grad_filter")
STRATEGIES = ("auto", "direct", "shifted", "im2col")
DTYPES = ("float32", "float64")
STEP_ARITY = {"bias": 0, "affine": 0, "relu": 1, "add": 0}

# Stride-1 convs use shifted GEMMs only when at least this fraction of the
# padded positions they compute are real outputs (32x32: 0.89, 16x16: 0.79 ->
# shifted; 8x8: 0.64 -> im2col), see the measurements in the design note.
SHIFTED_MIN_USEFUL = 0.75

# Target GEMM rows per chunk: small enough that the chunk stays in L2 while
# the epilogue runs on it, large enough that BLAS call overhead is negligible.
CHUNK_ROWS_TARGET = 1024


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ConvSig.{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name, value):
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"ConvSig.{name} must be finite, got {value!r}")
    return value


def _normalize_step(step):
    step = tuple(step)
    if not step or step[0] not in STEP_ARITY:
        raise ValueError(f"unknown epilogue step {step!r}; known: {sorted(STEP_ARITY)}")
    if len(step) != 1 + STEP_ARITY[step[0]]:
        raise ValueError(f"epilogue step {step!r} needs {STEP_ARITY[step[0]]} argument(s)")
    if step[0] == "relu":
        return ("relu", _check_float("epilogue relu alpha", step[1]))
    return step


class ConvGeometry:
    """What a conv kernel signature and a unit layer share: one k x k conv of an h x w x cin
    input with a stride and explicit (top, bottom, left, right) pads, and its epilogue."""

    hp = property(lambda s: s.h + s.pads[0] + s.pads[1])
    wp = property(lambda s: s.w + s.pads[2] + s.pads[3])
    oh = property(lambda s: (s.hp - s.k) // s.stride + 1)
    ow = property(lambda s: (s.wp - s.k) // s.stride + 1)

    def _check_geometry(self) -> None:
        """Validate sizes and pads; store pads and epilogue in canonical (tuple) form."""
        for name in ("h", "w", "cin", "cout", "k", "stride"):
            _check_int(name, getattr(self, name), 1)
        pads = tuple(self.pads)
        if len(pads) != 4:
            raise ValueError(f"{type(self).__name__}.pads must be (top, bottom, left, right), "
                             f"got {pads!r}")
        for p in pads:
            _check_int("pads", p, 0)
        object.__setattr__(self, "pads", pads)
        object.__setattr__(self, "epilogue", tuple(_normalize_step(s) for s in self.epilogue))
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"empty output for {self}")


@dataclass(frozen=True)
class ConvSig(ConvGeometry):
    """Everything that determines one generated conv kernel (N is left free).

    ``h, w``: the forward input's spatial size; ``pads``: (top, bottom, left,
    right) as computed by the caller.  ``epilogue``/``has_out2``/``alpha2`` only
    for ``op == "forward"``.  ``chunk_rows`` 0 = automatic.  ``groups``: how many
    contiguous work ranges a parallel kernel splits into (0 = NUMBA_NUM_THREADS
    at generation time).
    """
    op: str
    h: int
    w: int
    cin: int
    cout: int
    k: int
    stride: int = 1
    pads: tuple = (0, 0, 0, 0)
    dtype: str = "float32"
    epilogue: tuple = ()
    has_out2: bool = False
    alpha2: float = 0.0
    parallel: bool = True
    strategy: str = "auto"
    chunk_rows: int = 0
    groups: int = 0

    def __post_init__(self):
        setf = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.op not in OPS:
            raise ValueError(f"ConvSig.op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ConvSig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        self._check_geometry()
        _check_int("chunk_rows", self.chunk_rows, 0)
        _check_int("groups", self.groups, 0)
        setf("alpha2", _check_float("alpha2", self.alpha2))
        setf("has_out2", bool(self.has_out2))
        setf("parallel", bool(self.parallel))
        if self.op != "forward" and (self.epilogue or self.has_out2):
            raise ValueError(f"{self.op} kernels take no epilogue")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ConvSig.strategy must be one of {STRATEGIES}")
        if self.strategy == "direct" and not self.direct_ok:
            raise ValueError("strategy 'direct' needs k=1, stride 1 and no padding")
        if self.strategy == "shifted" and self.stride != 1:
            raise ValueError("strategy 'shifted' needs stride 1")

    # derived sizes
    padded = property(lambda s: any(s.pads))
    direct_ok = property(lambda s: s.k == 1 and s.stride == 1 and not s.padded)

    @property
    def resolved_strategy(self):
        if self.strategy != "auto":
            return self.strategy
        if self.direct_ok:
            return "direct"
        if self.stride == 1 and self.oh * self.ow >= SHIFTED_MIN_USEFUL * self.hp * self.wp:
            return "shifted"
        return "im2col"

    def digest(self):
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


def kernel_arg_names(sig):
    """Positional argument names of the generated kernel, in order.

    forward: x, w, then per epilogue step i: bias_i | scale_i, shift_i | res_i,
    then scale2, shift2 (if has_out2), out, out2 (if has_out2).
    grad_input: dy, w, dx.  grad_filter: x, dy, dw.
    """
    if sig.op == "grad_input":
        return ["dy", "w", "dx"]
    if sig.op == "grad_filter":
        return ["x", "dy", "dw"]
    return ["x", "w"] + epilogue_arg_names(sig.epilogue, "") + output_arg_names(sig)


def epilogue_arg_names(steps, tag: str) -> list[str]:
    """The kernel arguments an epilogue's steps read, named as `epilogue_lines` uses them."""
    names = []
    for j, step in enumerate(steps):
        name = f"{tag}{j}"
        names += {"bias": [f"bias_{name}"], "affine": [f"scale_{name}", f"shift_{name}"],
                  "relu": [], "add": [f"res_{name}"]}[step[0]]
    return names


def output_arg_names(sig) -> list[str]:
    """The second output's scale and shift, then the outputs."""
    return ["scale2", "shift2", "out", "out2"] if sig.has_out2 else ["out"]


# --- source building -----------------------------------------------------------------

class _Source:
    """Lines with indentation; ``with src.block("for ...:")`` indents."""

    def __init__(self):
        self.lines = []
        self.depth = 0

    def __call__(self, text=""):
        for line in text.splitlines() or [""]:
            self.lines.append("    " * self.depth + line if line else "")

    def block(self, header):
        self(header)
        source = self

        class _Indent:
            def __enter__(self):
                source.depth += 1

            def __exit__(self, *exc):
                source.depth -= 1
        return _Indent()

    def text(self):
        return "\n".join(self.lines) + "\n"


def _lit(sig, value):
    """A validated float as a literal of the kernel's dtype."""
    return f"np.{sig.dtype}({float(value)!r})"


def _chunk_rows(sig, row_len):
    """Output rows per chunk so that a chunk has about CHUNK_ROWS_TARGET GEMM rows."""
    if sig.chunk_rows:
        return min(sig.chunk_rows, sig.oh)
    rows = max(1, min(sig.oh, CHUNK_ROWS_TARGET // row_len))
    n_chunks = -(-sig.oh // rows)
    return -(-sig.oh // n_chunks)  # balanced: 32 rows in chunks of 16 + 16, not 30 + 2


def _header(src, sig, fn_name):
    src("# Generated by rescompile.backends.cpu.conv_codegen; do not edit.")
    src(f"# {sig!r}")
    src("# strategy: " + sig.resolved_strategy)
    src("import numba")
    src("import numpy as np")
    src("from rescompile.backends.cpu.blas import gemm")
    src("")
    src("")
    parallel = "True" if sig.parallel else "False"
    src("@numba.njit(cache=True, nogil=True, parallel=" + parallel + ", error_model='numpy',")
    src("            fastmath={'nsz', 'arcp', 'contract', 'afn', 'reassoc'})")
    src(f"def {fn_name}({', '.join(kernel_arg_names(sig))}):")


def _check_shape(src, array, shape_text):
    with src.block(f"if {array}.shape != {shape_text}:"):
        src(f"raise ValueError('{array}: wrong shape')")


def _prologue(src, sig, in_name, in_shape, flat_names):
    """Common start: batch size, shape checks, flat views, constants."""
    src(f"n_img = {in_name}.shape[0]")
    for name, shape in in_shape.items():
        _check_shape(src, name, shape)
    for name in flat_names:
        src(f"{name}f = {name}.reshape({name}.size)")
    src(f"zero = np.{sig.dtype}(0.0)")
    src(f"one = np.{sig.dtype}(1.0)")


def _work_groups(sig):
    if sig.groups:
        return sig.groups
    import numba
    return numba.config.NUMBA_NUM_THREADS


def _thread_split(src, sig, count):
    """Emit the outer loop over ``n_par`` contiguous ranges of ``count`` work items."""
    if sig.parallel:
        # A literal group count: numba.get_num_threads() would make the kernel uncacheable
        # (Numba compiles it as a dynamic address).  Extra groups just queue up.
        src(f"n_par = min({_work_groups(sig)}, {count})")
        header = "for t in numba.prange(n_par):"
    else:
        src("n_par = 1")
        header = "for t in range(n_par):"
    return header


@contextlib.contextmanager
def _row_chunks(src, sig, chunk, rows_per_image):
    """Open the loop over chunks ``[r0, r0 + rows)`` of all images' rows, split over threads;
    the caller emits the chunk's body inside."""
    src(f"total = n_img * {rows_per_image}")
    src(f"n_chunks = (total + {chunk - 1}) // {chunk}")
    with src.block(_thread_split(src, sig, "n_chunks")):
        with src.block("for ch in range(t * n_chunks // n_par, (t + 1) * n_chunks // n_par):"):
            src(f"r0 = ch * {chunk}")
            src(f"rows = min({chunk}, total - r0)")
            yield


def _fill_pad(src, sig, source_flat, image="n", slot="0"):
    """Copy image ``image`` into the interior of padded image ``slot`` of ``pad``."""
    h, w, cin, wp = sig.h, sig.w, sig.cin, sig.wp
    top, left = sig.pads[0], sig.pads[2]
    with src.block(f"for hh in range({h}):"):
        src(f"s0 = (({image}) * {h} + hh) * {w * cin}")
        src(f"d0 = {slot} * {sig.hp * wp * cin} + ((hh + {top}) * {wp} + {left}) * {cin}")
        with src.block(f"for q in range({w * cin}):"):
            src(f"pad[d0 + q] = {source_flat}[s0 + q]")


def _source_view(sig):
    """(array, base offset expression) the conv reads image n from."""
    if sig.padded:
        return "pad", "0"
    return "xf", f"n * {sig.h * sig.w * sig.cin}"


def _fill_im2col(src, sig, row0, rows):
    """Gather k*k*cin patches of output rows [row0, row0 + rows) into ``cols``."""
    k, s, cin, ow, wp = sig.k, sig.stride, sig.cin, sig.ow, sig.wp
    kkc = k * k * cin
    array, base = _source_view(sig)
    with src.block(f"for r in range({rows}):"):
        src(f"ih0 = ({row0} + r) * {s}")
        with src.block(f"for ow in range({ow}):"):
            src(f"dst = (r * {ow} + ow) * {kkc}")
            with src.block(f"for i in range({k}):"):
                with src.block(f"for j in range({k}):"):
                    src(f"s0 = {base} + ((ih0 + i) * {wp} + ow * {s} + j) * {cin}")
                    src(f"d0 = dst + (i * {k} + j) * {cin}")
                    with src.block(f"for c in range({cin}):"):
                        src(f"cols[d0 + c] = {array}[s0 + c]")


def epilogue_lines(sig, steps, tag: str, index: str) -> list[str]:
    """The chain applied to ``v`` at channel ``c``: the operands of step j are named
    ``bias_<tag><j>``, ``scale_/shift_<tag><j>``, ``res_<tag><j>f[<index> + c]``. Shared by the
    conv and unit generators, so an epilogue step means the same in both."""
    lines = []
    for j, step in enumerate(steps):
        name = f"{tag}{j}"
        lines.append({"bias": f"v += bias_{name}[c]",
                      "affine": f"v = v * scale_{name}[c] + shift_{name}[c]",
                      "add": f"v += res_{name}f[{index} + c]"}.get(step[0])
                     or _relu_line(sig, "v", step[1]))
    return lines


def out2_lines(sig, index: str) -> list[str]:
    """The second output, relu(v * scale2 + shift2), stored at ``out2f[index + c]``."""
    return ["v2 = v * scale2[c] + shift2[c]", _relu_line(sig, "v2", sig.alpha2),
            f"out2f[{index} + c] = v2"]


def _epilogue(src, sig, acc, a, o):
    """Per channel: v = acc[a + c], the chain, out[o + c] = v (and out2)."""
    with src.block(f"for c in range({sig.cout}):"):
        src(f"v = {acc}[{a} + c]")
        for line in epilogue_lines(sig, sig.epilogue, "", o):
            src(line)
        src(f"outf[{o} + c] = v")
        if sig.has_out2:
            for line in out2_lines(sig, o):
                src(line)


def _relu_line(sig, var, alpha):
    if alpha == 0.0:
        return f"{var} = {var} if {var} > zero else zero"
    return f"{var} = {var} if {var} >= zero else {_lit(sig, alpha)} * {var}"


# --- forward ------------------------------------------------------------------------

def _forward_body(src, sig):
    h, w, cin, cout, k, oh, ow = sig.h, sig.w, sig.cin, sig.cout, sig.k, sig.oh, sig.ow
    shapes = {"x": f"(n_img, {h}, {w}, {cin})", "w": f"({k}, {k}, {cin}, {cout})",
              "out": f"(n_img, {oh}, {ow}, {cout})"}
    flat = ["x", "w", "out"]
    for i, step in enumerate(sig.epilogue):
        if step[0] == "bias":
            shapes[f"bias_{i}"] = f"({cout},)"
        elif step[0] == "affine":
            shapes[f"scale_{i}"] = shapes[f"shift_{i}"] = f"({cout},)"
        elif step[0] == "add":
            shapes[f"res_{i}"] = shapes["out"]
            flat.append(f"res_{i}")
    if sig.has_out2:
        shapes["scale2"] = shapes["shift2"] = f"({cout},)"
        shapes["out2"] = shapes["out"]
        flat.append("out2")
    _prologue(src, sig, "x", shapes, flat)
    strategy = sig.resolved_strategy

    if strategy == "direct":
        chunk = CHUNK_ROWS_TARGET if not sig.chunk_rows else sig.chunk_rows
        with _row_chunks(src, sig, chunk, h * w):
            src(f"gemm(False, False, rows, {cout}, {cin}, one, xf[r0 * {cin}:], {cin},"
                f" wf, {cout}, zero, outf[r0 * {cout}:], {cout})")
            with src.block("for r in range(r0, r0 + rows):"):
                src(f"o = r * {cout}")
                _epilogue(src, sig, "outf", "o", "o")
        return

    if strategy == "shifted" and _images_per_chunk(sig) > 1:
        _forward_shifted_multi_image(src, sig)
        return
    row_len = sig.wp if strategy == "shifted" else ow
    rows_per_chunk = _chunk_rows(sig, row_len)
    with src.block(_thread_split(src, sig, "n_img")):
        if sig.padded:
            src(f"pad = np.zeros({sig.hp * sig.wp * cin}, np.{sig.dtype})")
        src(f"acc = np.empty({rows_per_chunk * row_len * cout}, np.{sig.dtype})")
        if strategy == "im2col":
            src(f"cols = np.empty({rows_per_chunk * ow * k * k * cin}, np.{sig.dtype})")
        with src.block("for n in range(t * n_img // n_par, (t + 1) * n_img // n_par):"):
            if sig.padded:
                _fill_pad(src, sig, "xf")
            with src.block(f"for oh0 in range(0, {oh}, {rows_per_chunk}):"):
                src(f"rows = min({rows_per_chunk}, {oh} - oh0)")
                if strategy == "shifted":
                    array, base = _source_view(sig)
                    src(f"m = (rows - 1) * {sig.wp} + {ow}")
                    with src.block(f"for i in range({k}):"):
                        with src.block(f"for j in range({k}):"):
                            src("beta = one if i + j > 0 else zero")
                            src(f"gemm(False, False, m, {cout}, {cin}, one,"
                                f" {array}[{base} + ((oh0 + i) * {sig.wp} + j) * {cin}:], {cin},"
                                f" wf[(i * {k} + j) * {cin * cout}:], {cout}, beta, acc, {cout})")
                else:
                    _fill_im2col(src, sig, "oh0", "rows")
                    src(f"gemm(False, False, rows * {ow}, {cout}, {k * k * cin}, one,"
                        f" cols, {k * k * cin}, wf, {cout}, zero, acc, {cout})")
                with src.block("for r in range(rows):"):
                    with src.block(f"for ow in range({ow}):"):
                        src(f"a = (r * {row_len} + ow) * {cout}")
                        src(f"o = ((n * {oh} + oh0 + r) * {ow} + ow) * {cout}")
                        _epilogue(src, sig, "acc", "a", "o")


def _images_per_chunk(sig):
    """Small images: stack several padded images so one GEMM covers them all."""
    if sig.chunk_rows:
        return 1
    return max(1, CHUNK_ROWS_TARGET // (sig.hp * sig.wp))


def _forward_shifted_multi_image(src, sig):
    """Shifted GEMMs over ``g`` padded images stacked into one tall image.

    Output "virtual" row vr = g*HP + oh; the k-1 rows between images are junk,
    like the k-1 columns per row, and the epilogue skips both.
    """
    cin, cout, k, oh, ow, hp, wp = sig.cin, sig.cout, sig.k, sig.oh, sig.ow, sig.hp, sig.wp
    ipc = _images_per_chunk(sig)
    with src.block(_thread_split(src, sig, "n_img")):
        if sig.padded:
            src(f"pad = np.zeros({ipc * hp * wp * cin}, np.{sig.dtype})")
        src(f"acc = np.empty({ipc * hp * wp * cout}, np.{sig.dtype})")
        src("n_end = (t + 1) * n_img // n_par")
        with src.block(f"for n0 in range(t * n_img // n_par, n_end, {ipc}):"):
            src(f"g_count = min({ipc}, n_end - n0)")
            if sig.padded:
                with src.block("for g in range(g_count):"):
                    _fill_pad(src, sig, "xf", image="n0 + g", slot="g")
                array, base = "pad", "0"
            else:
                array, base = "xf", f"n0 * {sig.h * sig.w * cin}"
            src(f"m = ((g_count - 1) * {hp} + {oh - 1}) * {wp} + {ow}")
            with src.block(f"for i in range({k}):"):
                with src.block(f"for j in range({k}):"):
                    src("beta = one if i + j > 0 else zero")
                    src(f"gemm(False, False, m, {cout}, {cin}, one,"
                        f" {array}[{base} + (i * {wp} + j) * {cin}:], {cin},"
                        f" wf[(i * {k} + j) * {cin * cout}:], {cout}, beta, acc, {cout})")
            with src.block("for g in range(g_count):"):
                with src.block(f"for r in range({oh}):"):
                    with src.block(f"for ow in range({ow}):"):
                        src(f"a = ((g * {hp} + r) * {wp} + ow) * {cout}")
                        src(f"o = (((n0 + g) * {oh} + r) * {ow} + ow) * {cout}")
                        _epilogue(src, sig, "acc", "a", "o")


# --- backward -----------------------------------------------------------------------

def _fill_dy_padded_width(src, sig):
    """dy of image n into D laid out on the padded row width (junk columns stay 0)."""
    oh, ow, cout, wp = sig.oh, sig.ow, sig.cout, sig.wp
    with src.block(f"for r in range({oh}):"):
        src(f"s0 = (n * {oh} + r) * {ow * cout}")
        src(f"d0 = r * {wp * cout}")
        with src.block(f"for q in range({ow * cout}):"):
            src("D[d0 + q] = dyf[s0 + q]")


def _grad_input_body(src, sig):
    h, w, cin, cout, k, s, oh, ow, wp = (sig.h, sig.w, sig.cin, sig.cout, sig.k,
                                         sig.stride, sig.oh, sig.ow, sig.wp)
    shapes = {"dy": f"(n_img, {oh}, {ow}, {cout})", "w": f"({k}, {k}, {cin}, {cout})",
              "dx": f"(n_img, {h}, {w}, {cin})"}
    _prologue(src, sig, "dy", shapes, ["dy", "w", "dx"])
    strategy = sig.resolved_strategy
    if strategy == "direct":
        with _row_chunks(src, sig, CHUNK_ROWS_TARGET, h * w):
            src(f"gemm(False, True, rows, {cin}, {cout}, one, dyf[r0 * {cout}:], {cout},"
                f" wf, {cout}, zero, dxf[r0 * {cin}:], {cin})")
        return

    kkc = k * k * cin
    with src.block(_thread_split(src, sig, "n_img")):
        src(f"dpad = np.empty({sig.hp * wp * cin}, np.{sig.dtype})")
        if strategy == "shifted":
            src(f"D = np.zeros({oh * wp * cout}, np.{sig.dtype})")
        else:
            src(f"cols = np.empty({oh * ow * kkc}, np.{sig.dtype})")
        with src.block("for n in range(t * n_img // n_par, (t + 1) * n_img // n_par):"):
            src("dpad[:] = zero")
            if strategy == "shifted":
                _fill_dy_padded_width(src, sig)
                src(f"m = {(oh - 1) * wp + ow}")
                with src.block(f"for i in range({k}):"):
                    with src.block(f"for j in range({k}):"):
                        src(f"gemm(False, True, m, {cin}, {cout}, one, D, {cout},"
                            f" wf[(i * {k} + j) * {cin * cout}:], {cout}, one,"
                            f" dpad[(i * {wp} + j) * {cin}:], {cin})")
            else:
                # col2im: cols = dy_n @ W^T, then scatter-add the patches.
                src(f"gemm(False, True, {oh * ow}, {kkc}, {cout}, one,"
                    f" dyf[n * {oh * ow * cout}:], {cout}, wf, {cout}, zero, cols, {kkc})")
                with src.block(f"for r in range({oh}):"):
                    with src.block(f"for ow in range({ow}):"):
                        with src.block(f"for i in range({k}):"):
                            with src.block(f"for j in range({k}):"):
                                src(f"s0 = ((r * {ow} + ow) * {k * k} + i * {k} + j) * {cin}")
                                src(f"d0 = ((r * {s} + i) * {wp} + ow * {s} + j) * {cin}")
                                with src.block(f"for c in range({cin}):"):
                                    src("dpad[d0 + c] += cols[s0 + c]")
            top, left = sig.pads[0], sig.pads[2]
            with src.block(f"for hh in range({h}):"):
                src(f"s0 = ((hh + {top}) * {wp} + {left}) * {cin}")
                src(f"d0 = (n * {h} + hh) * {w * cin}")
                with src.block(f"for q in range({w * cin}):"):
                    src("dxf[d0 + q] = dpad[s0 + q]")


def _grad_filter_body(src, sig):
    h, w, cin, cout, k, oh, ow, wp = (sig.h, sig.w, sig.cin, sig.cout, sig.k,
                                      sig.oh, sig.ow, sig.wp)
    kkc = k * k * cin
    shapes = {"x": f"(n_img, {h}, {w}, {cin})", "dy": f"(n_img, {oh}, {ow}, {cout})",
              "dw": f"({k}, {k}, {cin}, {cout})"}
    _prologue(src, sig, "x", shapes, ["x", "dy", "dw"])
    strategy = sig.resolved_strategy
    count = "n_chunks" if strategy == "direct" else "n_img"
    if strategy == "direct":
        chunk = CHUNK_ROWS_TARGET
        src(f"total = n_img * {h * w}")
        src(f"n_chunks = (total + {chunk - 1}) // {chunk}")
    header = _thread_split(src, sig, count)
    # Per-thread partial sums, reduced after the parallel loop.
    src(f"part = np.zeros(max(n_par, 1) * {kkc * cout}, np.{sig.dtype})")
    with src.block(header):
        src(f"p0 = t * {kkc * cout}")
        if strategy == "direct":
            with src.block("for ch in range(t * n_chunks // n_par, (t + 1) * n_chunks // n_par):"):
                src(f"r0 = ch * {chunk}")
                src(f"rows = min({chunk}, total - r0)")
                src(f"gemm(True, False, {cin}, {cout}, rows, one, xf[r0 * {cin}:], {cin},"
                    f" dyf[r0 * {cout}:], {cout}, one, part[p0:], {cout})")
        else:
            if sig.padded:
                src(f"pad = np.zeros({sig.hp * wp * cin}, np.{sig.dtype})")
            if strategy == "shifted":
                src(f"D = np.zeros({oh * wp * cout}, np.{sig.dtype})")
            else:
                src(f"cols = np.empty({oh * ow * kkc}, np.{sig.dtype})")
            with src.block("for n in range(t * n_img // n_par, (t + 1) * n_img // n_par):"):
                if sig.padded:
                    _fill_pad(src, sig, "xf")
                if strategy == "shifted":
                    array, base = _source_view(sig)
                    _fill_dy_padded_width(src, sig)
                    src(f"m = {(oh - 1) * wp + ow}")
                    with src.block(f"for i in range({k}):"):
                        with src.block(f"for j in range({k}):"):
                            src(f"gemm(True, False, {cin}, {cout}, m, one,"
                                f" {array}[{base} + (i * {wp} + j) * {cin}:], {cin}, D, {cout},"
                                f" one, part[p0 + (i * {k} + j) * {cin * cout}:], {cout})")
                else:
                    _fill_im2col(src, sig, "0", oh)
                    src(f"gemm(True, False, {kkc}, {cout}, {oh * ow}, one, cols, {kkc},"
                        f" dyf[n * {oh * ow * cout}:], {cout}, one, part[p0:], {cout})")
    with src.block(f"for q in range({kkc * cout}):"):
        src("acc = zero")
        with src.block("for t in range(n_par):"):
            src(f"acc += part[t * {kkc * cout} + q]")
        src("dwf[q] = acc")


_BODIES = {"forward": _forward_body, "grad_input": _grad_input_body,
           "grad_filter": _grad_filter_body}
_PREFIX = {"forward": "conv_fwd", "grad_input": "conv_dx", "grad_filter": "conv_dw"}


def conv_kernel_source(sig):
    """Return ``(fn_name, source)``: a module defining one njit kernel for ``sig``."""
    fn_name = f"{_PREFIX[sig.op]}_{sig.digest()}"
    src = _Source()
    _header(src, sig, fn_name)
    src.depth += 1
    _BODIES[sig.op](src, sig)
    return fn_name, src.text()


def conv_kernel(sig, cache_dir=None):
    """Generate, write, import: the compiled-on-first-call kernel for ``sig``."""
    from rescompile.backends.cpu.kernel_cache import compile_source
    return compile_source(*conv_kernel_source(sig), cache_dir=cache_dir)
