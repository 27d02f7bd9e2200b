"""Generate one Numba kernel for a chain of convolutions (a bottleneck unit), tiled across layers.

Design note
-----------
Layer by layer, a bottleneck unit moves its intermediate tensors through memory: conv1
writes h1, conv2 reads it back (after a padded copy), writes h2, conv3 reads it. NUMBA-NOTES
("One whole bottleneck unit") measured the alternative that won: cross-layer tiling. A work
item is one image (or a group of small images); the whole chain runs on it before the next
item, so only x, y and the second output touch memory, and h1/h2 live in per-thread scratch
that stays in cache.

    x rows --GEMM--> acc1 --epilogue1--> interior of a zero-bordered padded buffer P2
    P2 --k*k shifted GEMMs (beta = 1)--> acc2 (padded row width) --epilogue2--> h2 rows
    h2 rows --GEMM--> y rows (in place) --epilogue3 (+ residual, out2)--> y, out2

A chain is any list of ``Layer``s where each layer's input is the previous layer's output;
each layer is computed by one of:

* ``gemm``    1x1, stride 1, no padding: one GEMM over the item's rows;
* ``gather``  1x1, stride s, no padding: strided rows gathered into scratch, then GEMM;
* ``shifted`` stride 1 over a padded input: one GEMM per tap on a shifted view of the
  padded buffer (output over the padded row width; the epilogue skips junk columns and the
  junk rows between stacked images), accumulated with beta = 1, no im2col;
* ``im2col``  stride s over a padded input: patches gathered into scratch, one GEMM.

A layer whose input needs padding reads it from a per-thread padded buffer whose border is
zeroed once per thread: the previous layer's epilogue writes the interior (the first layer's
input is copied in). The last layer's GEMM (when its accumulator is row-compact) writes
straight into ``out`` and its epilogue runs in place.

Epilogue steps (as ``conv_codegen``): ``("bias",)``, ``("affine",)``, ``("relu", alpha)``;
the last layer also ``("add",)`` (a residual read from memory) and the second output
``relu(affine(y), alpha2)``.

Threads: like conv_codegen, ``parallel=True`` kernels spread contiguous ranges of work items
over ``groups`` prange workers with BLAS held at one thread (the caller's
``set_blas_threads(1)``); the ``parallel=False`` variant is for batch 1.

Kernel arguments, in order: x; per layer i: w_i, then its epilogue operands (bias_i_j |
scale_i_j, shift_i_j | res_i_j); then scale2, shift2 (with out2); out; out2 (with out2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .conv_codegen import (DTYPES, ConvGeometry, _check_float, _check_int, _Source,
                           epilogue_arg_names, epilogue_lines, out2_lines, output_arg_names)

# Rows of the first layer's input per work item: whole images at 32x32 and 16x16, four
# images at 8x8 (NUMBA-NOTES: whole images for stages 1-2, groups of 4-8 for stage 3).
ITEM_ROWS_TARGET = 256


@dataclass(frozen=True)
class Layer(ConvGeometry):
    """One conv of the chain: input h x w x cin, k x k filter, stride, (top, bottom, left,
    right) pads, epilogue steps."""
    h: int
    w: int
    cin: int
    cout: int
    k: int
    stride: int = 1
    pads: tuple = (0, 0, 0, 0)
    epilogue: tuple = ()
    im2col: bool = False  # a stride-1 k x k layer as im2col (one GEMM, K = k*k*cin)

    def __post_init__(self):
        self._check_geometry()

    padded_input = property(lambda s: s.k > 1 or any(s.pads))

    @property
    def method(self) -> str:
        if self.padded_input:
            return "shifted" if self.stride == 1 and not self.im2col else "im2col"
        return "gemm" if self.stride == 1 else "gather"

    @property
    def compact_acc(self) -> bool:
        """Whether the accumulator is [rows, cout] with one row per output pixel."""
        return self.method != "shifted"


@dataclass(frozen=True)
class UnitSig:
    layers: tuple
    dtype: str = "float32"
    has_out2: bool = False
    alpha2: float = 0.0
    parallel: bool = True
    images_per_item: int = 0  # 0 = automatic (ITEM_ROWS_TARGET)
    groups: int = 0  # prange workers; 0 = NUMBA_NUM_THREADS at generation time

    def __post_init__(self):
        layers = tuple(self.layers)
        if len(layers) < 2:
            raise ValueError("a unit chains at least two convs")
        if self.dtype not in DTYPES:
            raise ValueError(f"UnitSig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for prev, cur in zip(layers, layers[1:]):
            if (prev.oh, prev.ow, prev.cout) != (cur.h, cur.w, cur.cin):
                raise ValueError(f"layer {cur} does not take the output of {prev}")
        for layer in layers[:-1]:
            if any(step[0] == "add" for step in layer.epilogue):
                raise ValueError("only the last layer of a unit may add a residual")
        _check_int("images_per_item", self.images_per_item, 0)
        _check_int("groups", self.groups, 0)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "alpha2", _check_float("alpha2", self.alpha2))
        object.__setattr__(self, "has_out2", bool(self.has_out2))
        object.__setattr__(self, "parallel", bool(self.parallel))

    @property
    def item_images(self) -> int:
        if self.images_per_item:
            return self.images_per_item
        first = self.layers[0]
        return max(1, ITEM_ROWS_TARGET // (first.h * first.w))

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


def unit_arg_names(sig: UnitSig) -> list[str]:
    names = ["x"]
    for i, layer in enumerate(sig.layers):
        names += [f"w_{i}"] + epilogue_arg_names(layer.epilogue, f"{i}_")
    return names + output_arg_names(sig)


class _Gen:
    """Source for one UnitSig; buffer names: P{i} padded input of layer i, S{i} compact input
    of layer i (i > 0), C{i} gather/im2col scratch, A{i} accumulator."""

    def __init__(self, sig: UnitSig, name: str):
        self.sig, self.name, self.src = sig, name, _Source()
        self.last = len(sig.layers) - 1
        self.G = sig.item_images

    def acc_name(self, i: int) -> str:
        layer = self.sig.layers[i]
        return "outf" if i == self.last and layer.compact_acc else f"A{i}"

    def acc_offset(self, i: int) -> str:
        return f"n0 * {self._out_rows(i) * self.sig.layers[i].cout}" \
            if self.acc_name(i) == "outf" else "0"

    def _out_rows(self, i: int) -> int:
        layer = self.sig.layers[i]
        return layer.oh * layer.ow

    # -- source ---------------------------------------------------------------------------
    def source(self) -> str:
        sig, src = self.sig, self.src
        src("# Generated by rescompile.backends.cpu.unit_codegen; do not edit.")
        for layer in sig.layers:
            src(f"# {layer!r} method={layer.method}")
        src(f"# images per work item: {self.G}")
        src("import numba")
        src("import numpy as np")
        src("from rescompile.backends.cpu.blas import gemm")
        src("")
        src("")
        src(f"@numba.njit(cache=True, nogil=True, parallel={sig.parallel}, error_model='numpy',")
        src("            fastmath={'nsz', 'arcp', 'contract', 'afn', 'reassoc'})")
        src(f"def {self.name}({', '.join(unit_arg_names(sig))}):")
        src.depth += 1
        self.prologue()
        self.body()
        return src.text()

    def prologue(self) -> None:
        sig, src = self.sig, self.src
        first, final = sig.layers[0], sig.layers[-1]
        out_shape = f"(n_img, {final.oh}, {final.ow}, {final.cout})"
        shapes = {"x": f"(n_img, {first.h}, {first.w}, {first.cin})"}
        flat = ["x", "out"]
        for i, layer in enumerate(sig.layers):
            shapes[f"w_{i}"] = f"({layer.k}, {layer.k}, {layer.cin}, {layer.cout})"
            flat.append(f"w_{i}")
            for j, step in enumerate(layer.epilogue):
                if step[0] == "bias":
                    shapes[f"bias_{i}_{j}"] = f"({layer.cout},)"
                elif step[0] == "affine":
                    shapes[f"scale_{i}_{j}"] = shapes[f"shift_{i}_{j}"] = f"({layer.cout},)"
                elif step[0] == "add":
                    shapes[f"res_{i}_{j}"] = out_shape
                    flat.append(f"res_{i}_{j}")
        shapes["out"] = out_shape
        if sig.has_out2:
            shapes["scale2"] = shapes["shift2"] = f"({final.cout},)"
            shapes["out2"] = out_shape
            flat.append("out2")
        src("n_img = x.shape[0]")
        for name, shape in shapes.items():
            with src.block(f"if {name}.shape != {shape}:"):
                src(f"raise ValueError('{name}: wrong shape')")
        for name in flat:
            src(f"{name}f = {name}.reshape({name}.size)")
        src(f"zero = np.{sig.dtype}(0.0)")
        src(f"one = np.{sig.dtype}(1.0)")

    def body(self) -> None:
        sig, src, G = self.sig, self.src, self.G
        src(f"n_items = (n_img + {G - 1}) // {G}")
        if sig.parallel:
            groups = sig.groups
            if not groups:
                import numba
                groups = numba.config.NUMBA_NUM_THREADS
            src(f"n_par = min({groups}, n_items)")
            header = "for t in numba.prange(n_par):"
        else:
            src("n_par = 1")
            header = "for t in range(n_par):"
        with src.block(header):
            self.scratch()
            with src.block("for item in range(t * n_items // n_par, (t + 1) * n_items // n_par):"):
                src(f"n0 = item * {G}")
                src(f"g_count = min({G}, n_img - n0)")
                for i in range(len(sig.layers)):
                    src(f"# layer {i}: {sig.layers[i].method}")
                    self.layer(i)

    def scratch(self) -> None:
        """Per-thread buffers; padded ones zeroed once (only their interiors are written)."""
        sig, src, G, dt = self.sig, self.src, self.G, self.sig.dtype
        for i, layer in enumerate(sig.layers):
            if layer.padded_input:
                src(f"P{i} = np.zeros({G * layer.hp * layer.wp * layer.cin}, np.{dt})")
            elif i > 0:
                src(f"S{i} = np.empty({G * layer.h * layer.w * layer.cin}, np.{dt})")
            if layer.method == "gather":
                src(f"C{i} = np.empty({G * layer.oh * layer.ow * layer.cin}, np.{dt})")
            elif layer.method == "im2col":
                kkc = layer.k * layer.k * layer.cin
                src(f"C{i} = np.empty({G * layer.oh * layer.ow * kkc}, np.{dt})")
            if self.acc_name(i) != "outf":
                rows = layer.hp * layer.wp if layer.method == "shifted" else layer.oh * layer.ow
                src(f"A{i} = np.empty({G * rows * layer.cout}, np.{dt})")

    def layer(self, i: int) -> None:
        sig, src = self.sig, self.src
        layer = sig.layers[i]
        h, w, cin, cout, k, s = layer.h, layer.w, layer.cin, layer.cout, layer.k, layer.stride
        oh, ow = layer.oh, layer.ow
        acc, acc_off = self.acc_name(i), self.acc_offset(i)
        if i == 0 and layer.padded_input:
            self.fill_pad_from_x(layer)
        # the layer's compact input rows (1x1 layers)
        if i == 0:
            rows_src, rows_off = "xf", f"n0 * {h * w * cin}"
        else:
            rows_src, rows_off = f"S{i}", "0"
        method = layer.method
        if method == "gemm":
            src(f"gemm(False, False, g_count * {h * w}, {cout}, {cin}, one,"
                f" {rows_src}[{rows_off}:], {cin}, w_{i}f, {cout}, zero, {acc}[{acc_off}:], {cout})")
        elif method == "gather":
            with src.block("for g in range(g_count):"):
                with src.block(f"for r in range({oh}):"):
                    with src.block(f"for c_ow in range({ow}):"):
                        src(f"s0 = {rows_off} + ((g * {h} + r * {s}) * {w} + c_ow * {s}) * {cin}")
                        src(f"d0 = ((g * {oh} + r) * {ow} + c_ow) * {cin}")
                        with src.block(f"for c in range({cin}):"):
                            src(f"C{i}[d0 + c] = {rows_src}[s0 + c]")
            src(f"gemm(False, False, g_count * {oh * ow}, {cout}, {cin}, one,"
                f" C{i}, {cin}, w_{i}f, {cout}, zero, {acc}[{acc_off}:], {cout})")
        elif method == "shifted":
            hp, wp = layer.hp, layer.wp
            src(f"m = ((g_count - 1) * {hp} + {oh - 1}) * {wp} + {ow}")
            with src.block(f"for i in range({k}):"):
                with src.block(f"for j in range({k}):"):
                    src("beta = one if i + j > 0 else zero")
                    src(f"gemm(False, False, m, {cout}, {cin}, one, P{i}[(i * {wp} + j) * {cin}:],"
                        f" {cin}, w_{i}f[(i * {k} + j) * {cin * cout}:], {cout}, beta,"
                        f" {acc}, {cout})")
        else:  # im2col
            hp, wp, kkc = layer.hp, layer.wp, k * k * cin
            with src.block("for g in range(g_count):"):
                with src.block(f"for r in range({oh}):"):
                    with src.block(f"for c_ow in range({ow}):"):
                        src(f"dst = ((g * {oh} + r) * {ow} + c_ow) * {kkc}")
                        with src.block(f"for i in range({k}):"):
                            with src.block(f"for j in range({k}):"):
                                src(f"s0 = ((g * {hp} + r * {s} + i) * {wp} + c_ow * {s} + j)"
                                    f" * {cin}")
                                src(f"d0 = dst + (i * {k} + j) * {cin}")
                                with src.block(f"for c in range({cin}):"):
                                    src(f"C{i}[d0 + c] = P{i}[s0 + c]")
            src(f"gemm(False, False, g_count * {oh * ow}, {cout}, {kkc}, one,"
                f" C{i}, {kkc}, w_{i}f, {cout}, zero, {acc}[{acc_off}:], {cout})")
        self.epilogue(i)

    def fill_pad_from_x(self, layer: Layer) -> None:
        src = self.src
        h, w, cin, hp, wp = layer.h, layer.w, layer.cin, layer.hp, layer.wp
        top, left = layer.pads[0], layer.pads[2]
        with src.block("for g in range(g_count):"):
            with src.block(f"for hh in range({h}):"):
                src(f"s0 = ((n0 + g) * {h} + hh) * {w * cin}")
                src(f"d0 = ((g * {hp} + hh + {top}) * {wp} + {left}) * {cin}")
                with src.block(f"for q in range({w * cin}):"):
                    src("P0[d0 + q] = xf[s0 + q]")

    def epilogue(self, i: int) -> None:
        """acc of layer i -> (next layer's padded interior | next compact input | out)."""
        sig, src = self.sig, self.src
        layer = sig.layers[i]
        oh, ow, cout = layer.oh, layer.ow, layer.cout
        acc = self.acc_name(i)
        if layer.method == "shifted":
            a_expr = f"((g * {layer.hp} + r) * {layer.wp} + c_ow) * {cout}"
        elif acc == "outf":
            a_expr = f"(((n0 + g) * {oh} + r) * {ow} + c_ow) * {cout}"
        else:
            a_expr = f"((g * {oh} + r) * {ow} + c_ow) * {cout}"
        if i == self.last:
            dst, d_expr = "outf", f"(((n0 + g) * {oh} + r) * {ow} + c_ow) * {cout}"
        else:
            nxt = sig.layers[i + 1]
            if nxt.padded_input:
                dst = f"P{i + 1}"
                d_expr = (f"((g * {nxt.hp} + r + {nxt.pads[0]}) * {nxt.wp} + c_ow + {nxt.pads[2]})"
                          f" * {cout}")
            else:
                dst, d_expr = f"S{i + 1}", f"((g * {oh} + r) * {ow} + c_ow) * {cout}"
        with src.block("for g in range(g_count):"):
            with src.block(f"for r in range({oh}):"):
                with src.block(f"for c_ow in range({ow}):"):
                    src(f"a = {a_expr}")
                    src(f"d = {d_expr}")
                    with src.block(f"for c in range({cout}):"):
                        src(f"v = {acc}[a + c]")
                        for line in epilogue_lines(sig, layer.epilogue, f"{i}_", "d"):
                            src(line)
                        src(f"{dst}[d + c] = v")
                        if i == self.last and sig.has_out2:
                            for line in out2_lines(sig, "d"):
                                src(line)


def unit_kernel_source(sig: UnitSig) -> tuple[str, str]:
    """``(fn_name, module source)`` of the kernel for ``sig``."""
    name = f"unit_{sig.digest()}"
    return name, _Gen(sig, name).source()


def unit_kernel(sig: UnitSig, cache_dir=None):
    from .kernel_cache import compile_source
    return compile_source(*unit_kernel_source(sig), cache_dir=cache_dir)
