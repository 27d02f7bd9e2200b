"""Convolutions, their gradients, dense and matmul as one tiled implicit GEMM.

Design note
-----------
Every op here is C[M, N] = sum_k A(m, k) * B(k, n) written row-major into a flat output, with
A and B *gathered* on the fly by generated index arithmetic (no im2col buffer):

    conv2d             M = batch*OH*OW  N = Cout  K = k*k*Cin   A = input patch, B = W [K, N]
    conv2d_grad_input  M = batch*H*W    N = Cin   K = k*k*Cout  A = dy at the output pixel that
                       tap (i, j) of input pixel m came from (if the stride hits it), B = W^T per tap
    conv2d_grad_filter M = k*k*Cin      N = Cout  K = batch*OH*OW  A = input patch^T, B = dy
    dense / matmul     plain A and B (optionally transposed)

A block computes a TILE_M x TILE_N tile: each K slab of TILE_K is staged into shared arrays
(sizes baked into the source), then every thread accumulates REG_M x REG_N outputs strided
across the tile (so neighbouring threads store neighbouring channels). The fused epilogue
(bias, affine, leaky ReLU, residual add, optional second output) runs on the accumulator
before the only store. When the tile grid is too small to fill the GPU (filter gradients:
small M*N, huge K), K is split across grid.z into a scratch buffer and a second kernel sums
the splits in a fixed order and applies the epilogue: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...padding import pads_2d
from . import exprs
from .launch import Context, Launch, Ref, cdiv, grid_launch, value
from .pooled import pooled_operands, pooled_read
from .source import indent, kernel_module


@dataclass(frozen=True)
class Gather:
    lines: tuple[str, ...]  # index arithmetic from (m, k) or (k, n)
    cond: str               # in bounds (padding reads as zero)
    expr: str


@dataclass(frozen=True)
class Problem:
    m: int
    n: int
    k: int
    a: Gather  # A(m, k)
    b: Gather  # B(k, n)


def _pixel(var: str, flat: str, h: int, w: int) -> list[str]:
    """Split a flat NHW pixel index into (var_b, var_h, var_w)."""
    return [f"{var}_b = {flat} // {h * w}", f"{var}_h = ({flat} // {w}) % {h}",
            f"{var}_w = {flat} % {w}"]


def _tap(flat: str, channels: int, k: int) -> list[str]:
    return [f"tap = {flat} // {channels}", f"ch = {flat} % {channels}",
            f"ti = tap // {k}", f"tj = tap % {k}"]


def _input_pixels(x, k: int, attrs, index_lines: list[str]) -> Gather:
    """The input pixel that output pixel (p_h, p_w) reads at tap (ti, tj), channel ch, given
    the lines that set those from the flat indices; zero where it falls in the padding."""
    _, h, wd, cin = x
    top, _, left, _ = pads_2d(h, wd, k, attrs["stride"], attrs["padding"])
    s = attrs["stride"]
    return Gather(tuple(index_lines + [f"ih = p_h * {s} + ti - {top}",
                                       f"iw = p_w * {s} + tj - {left}"]),
                  f"ih >= 0 and ih < {h} and iw >= 0 and iw < {wd}",
                  f"in0[((p_b * {h} + ih) * {wd} + iw) * {cin} + ch]")


def conv_problem(x, w, y, attrs) -> Problem:
    (_, _, _, cin), (k, _, _, cout), (_, oh, ow, _) = x, w, y
    a = _input_pixels(x, k, attrs, _pixel("p", "m", oh, ow) + _tap("k", cin, k))
    b = Gather((), "True", f"in1[k * {cout} + n]")
    return Problem(y[0] * oh * ow, cout, k * k * cin, a, b)


def conv_grad_input_problem(dy, w, dx, attrs) -> Problem:
    (_, oh, ow, cout), (k, _, cin, _), (_, h, wd, _) = dy, w, dx
    top, _, left, _ = pads_2d(h, wd, k, attrs["stride"], attrs["padding"])
    s = attrs["stride"]
    a = Gather(tuple(_pixel("p", "m", h, wd) + _tap("k", cout, k) +
                     [f"th = p_h + {top} - ti", f"tw = p_w + {left} - tj"]),
               f"th >= 0 and tw >= 0 and th % {s} == 0 and tw % {s} == 0 and "
               f"th < {oh * s} and tw < {ow * s}",
               f"in0[((p_b * {oh} + th // {s}) * {ow} + tw // {s}) * {cout} + ch]")
    b = Gather((f"btap = k // {cout}", f"bf = k % {cout}"), "True",
               f"in1[(btap * {cin} + n) * {cout} + bf]")
    return Problem(dx[0] * h * wd, cin, k * k * cout, a, b)


def conv_grad_filter_problem(x, dy, dw, attrs) -> Problem:
    (_, _, _, cin), (_, oh, ow, cout), k = x, dy, dw[0]
    a = _input_pixels(x, k, attrs, _tap("m", cin, k) + _pixel("p", "k", oh, ow))
    b = Gather((), "True", f"in1[k * {cout} + n]")
    return Problem(k * k * cin, cout, dy[0] * oh * ow, a, b)


def matmul_problem(a_shape, b_shape, attrs) -> Problem:
    ta, tb = attrs.get("transpose_a", False), attrs.get("transpose_b", False)
    m, k = a_shape[::-1] if ta else a_shape
    n = b_shape[0] if tb else b_shape[1]
    a = Gather((), "True", f"in0[k * {m} + m]" if ta else f"in0[m * {k} + k]")
    b = Gather((), "True", f"in1[n * {k} + k]" if tb else f"in1[k * {n} + n]")
    return Problem(m, n, k, a, b)


# -- the kernel -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    m: int
    n: int
    k: int
    reg_m: int
    reg_n: int
    k_split: int  # K elements per grid.z slice

    @property
    def threads(self) -> tuple[int, int]:
        return self.n // self.reg_n, self.m // self.reg_m


def choose_tiles(p: Problem, target) -> Tiles:
    tile_n = min(target.max_tile_n, max(target.max_tile_n // 4, 1 << (p.n - 1).bit_length()))
    reg_n = max(1, tile_n // target.threads_n)
    blocks = cdiv(p.m, target.tile_m) * cdiv(p.n, tile_n)
    splits = max(1, min(cdiv(target.min_gemm_blocks, blocks), p.k // target.min_split_k))
    k_split = cdiv(cdiv(p.k, splits), target.tile_k) * target.tile_k
    return Tiles(target.tile_m, tile_n, target.tile_k, target.reg_m, reg_n, k_split)


def _stage(shared: str, outer: tuple[str, str], inner: tuple[str, str], n_inner: int,
           count: int, gather: Gather, bound: str, slot: str, dt: str) -> list[str]:
    """Cooperatively copy one slab of a gathered operand into shared memory. Element e goes
    to thread e % nthreads and the inner index varies fastest, so neighbouring threads read
    neighbouring addresses (K for the input patch, N for weights)."""
    load = list(gather.lines) + [f"if {gather.cond}:", f"    v = {gather.expr}"]
    return [f"for e in range(tid, {count}, nthreads):",
            f"    {outer[0]} = e // {n_inner}", f"    {inner[0]} = e % {n_inner}",
            f"    {outer[1]}", f"    {inner[1]}",
            f"    v = {dt}(0)", f"    if {bound}:"] + indent(load, 2) + \
           [f"    {shared}[{slot}] = v"]


def gemm_source(p: Problem, t: Tiles, n_inputs: int, store: list[str], dtype: str,
                comment: str) -> str:
    """`store` lines run per output element with `m`, `n`, `o` (= m*N + n) and `y` set."""
    dt = f"np.{dtype}"
    bx, by = t.threads
    a_stage = _stage("As", ("mm", "m = m0 + mm"), ("kk", "k = k0 + kk"), t.k, t.m * t.k, p.a,
                     f"m < {p.m} and k < k_end", "kk, mm", dt)
    b_stage = _stage("Bs", ("kk", "k = k0 + kk"), ("nn", "n = n0 + nn"), t.n, t.k * t.n, p.b,
                     f"n < {p.n} and k < k_end", "kk, nn", dt)
    body = [
        f"As = cuda.shared.array(({t.k}, {t.m}), dtype={dt})",
        f"Bs = cuda.shared.array(({t.k}, {t.n}), dtype={dt})",
        f"acc = cuda.local.array(({t.reg_m}, {t.reg_n}), dtype={dt})",
        "tx = cuda.threadIdx.x", "ty = cuda.threadIdx.y",
        f"tid = ty * {bx} + tx", f"nthreads = {bx * by}",
        f"m0 = cuda.blockIdx.y * {t.m}", f"n0 = cuda.blockIdx.x * {t.n}",
        f"k_begin = cuda.blockIdx.z * {t.k_split}", f"k_end = min({p.k}, k_begin + {t.k_split})",
        f"for r in range({t.reg_m}):", f"    for s in range({t.reg_n}):",
        f"        acc[r, s] = {dt}(0)",
        f"for k0 in range(k_begin, k_end, {t.k}):"]
    body += indent(a_stage + b_stage + ["cuda.syncthreads()"] + [
        f"for kk in range({t.k}):",
        f"    for r in range({t.reg_m}):",
        f"        a = As[kk, ty + r * {by}]",
        f"        for s in range({t.reg_n}):",
        f"            acc[r, s] += a * Bs[kk, tx + s * {bx}]",
        "cuda.syncthreads()"])
    body += [f"for r in range({t.reg_m}):", f"    m = m0 + ty + r * {by}",
             f"    for s in range({t.reg_n}):", f"        n = n0 + tx + s * {bx}",
             f"        if m < {p.m} and n < {p.n}:", f"            o = m * {p.n} + n",
             "            y = acc[r, s]"] + indent(store, 3)
    params = [f"in{j}" for j in range(n_inputs)] + ["out0", "out1"]
    return kernel_module(params, body, comment)


def _epilogue_store(node, shapes: list[tuple], out_shape: tuple, dtype: str, index: str,
                    channel: str, first_input: int = 0) -> list[str]:
    """Generated epilogue: exactly the node's steps, reading operand j (kernel parameter
    in{first_input + j}) at the element (`index`), its channel, as a scalar, or (an
    add_pooled step's) through its pool."""
    e = exprs.Emitter(dtype, prefix="ep")
    pooled, reads = pooled_operands(node), []

    def read(j):
        shape = tuple(shapes[j])
        if j in pooled:
            reads.extend(pooled_read(f"in{first_input + j}", out_shape, shape, pooled[j]["k"],
                                     pooled[j]["before"], index, f"np.{dtype}", f"pooled{j}"))
            return f"pooled{j}"
        where = index if shape == tuple(out_shape) else ("0" if not shape else channel)
        return f"in{first_input + j}[{where}]"

    attrs = node.attrs
    operands = [read(j) for j in range(len(shapes))]
    y = exprs.epilogue(e, attrs.get("epilogue", ()), "y", operands)
    first = len(e.lines)
    lines = reads + e.lines[:first] + [f"out0[{index}] = {y}"]
    if attrs.get("out2"):
        y2 = exprs.epilogue(e, attrs["out2"], y, operands)
        lines += e.lines[first:] + [f"out1[{index}] = {y2}"]
    return lines


def gemm_launches(ctx: Context, node, problem: Problem, inputs, outputs) -> list[Launch]:
    t = choose_tiles(problem, ctx.target)
    splits = cdiv(problem.k, t.k_split)
    shapes = [ctx.shape(v) for v in inputs]
    out_shape = ctx.shape(outputs[0])
    out_refs = [value(o) for o in outputs] + [value(outputs[0])] * (2 - len(outputs))
    grid = (cdiv(problem.n, t.n), cdiv(problem.m, t.m), splits)
    in_refs = tuple(value(v) for v in inputs)
    if splits == 1:
        store = _epilogue_store(node, shapes, out_shape, ctx.dtype, "o", "n")
        source = gemm_source(problem, t, len(inputs), store, ctx.dtype, f"{node.op} {node.name}")
        return [Launch(node.name, source, grid, t.threads, in_refs + tuple(out_refs))]
    mn = problem.m * problem.n
    part = ctx.temp(node, "splitk", splits * mn)
    store = [f"out0[cuda.blockIdx.z * {mn} + o] = y"]
    source = gemm_source(problem, t, len(inputs), store, ctx.dtype,
                         f"{node.op} {node.name} (split K)")
    first = Launch(node.name, source, grid, t.threads, in_refs + (part, part))
    return [first, _sum_splits(ctx, node, part, splits, mn, problem.n, inputs, outputs,
                               shapes, out_shape)]


def _sum_splits(ctx, node, part: Ref, splits, mn, n, inputs, outputs, shapes, out_shape):
    """Second level: y = the K splits summed in order, then the epilogue, per element."""
    dt = f"np.{ctx.dtype}"
    lines = [f"y = {dt}(0)", f"for z in range({splits}):", f"    y += in0[z * {mn} + i]"]
    lines += _epilogue_store(node, shapes, out_shape, ctx.dtype, "i", f"(i % {n})",
                             first_input=1)
    refs = (part,) + tuple(value(v) for v in inputs) + tuple(value(o) for o in outputs)
    params = [f"in{k}" for k in range(1 + len(inputs))] + \
             [f"out{k}" for k in range(len(outputs))]
    loop = [f"for i in range(cuda.grid(1), {mn}, cuda.gridsize(1)):"] + indent(lines)
    source = kernel_module(params, loop, f"{node.op} {node.name} (sum of K splits)")
    return grid_launch(ctx, node.name, source, mn, refs)


# -- lowerings ---------------------------------------------------------------------------------
def lower_conv(ctx: Context, node) -> list[Launch]:
    x, w = node.inputs[:2]
    p = conv_problem(ctx.shape(x), ctx.shape(w), ctx.shape(node.outputs[0]), node.attrs)
    return gemm_launches(ctx, node, p, node.inputs, node.outputs)


def lower_conv_grad_input(ctx: Context, node) -> list[Launch]:
    dy, w = node.inputs
    p = conv_grad_input_problem(ctx.shape(dy), ctx.shape(w), ctx.shape(node.outputs[0]),
                                node.attrs)
    return gemm_launches(ctx, node, p, node.inputs, node.outputs)


def lower_conv_grad_filter(ctx: Context, node) -> list[Launch]:
    x, dy = node.inputs
    p = conv_grad_filter_problem(ctx.shape(x), ctx.shape(dy), ctx.shape(node.outputs[0]),
                                 node.attrs)
    return gemm_launches(ctx, node, p, node.inputs, node.outputs)


def lower_matmul(ctx: Context, node) -> list[Launch]:
    a, b = node.inputs
    p = matmul_problem(ctx.shape(a), ctx.shape(b), node.attrs)
    return gemm_launches(ctx, node, p, node.inputs, node.outputs)


def lower_dense(ctx: Context, node) -> list[Launch]:
    """dense = matmul with a bias epilogue (ops/head.py: x @ w + b)."""
    dense = node.replace(attrs={"epilogue": [{"op": "bias_add", "args": [2]}]})
    p = matmul_problem(ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1]), {})
    return gemm_launches(ctx, dense, p, node.inputs, node.outputs)
