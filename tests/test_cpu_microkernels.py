"""The CPU backend's micro-kernels against float64 NumPy: the conv tile over odd sizes (pixels,
channels and depth not multiples of the register block; strides 1 and 2; 1x1, 3x3 and 7x7;
every epilogue; a call covering part of the pixels and channels), the pixelwise kernels, every
instruction set this CPU can run, and the object cache.

Tolerances, relative to the expected tensor's max: float32 1e-5 (a K <= 300 term float32 dot
product of unit normals errs by about 1e-6 of the output's max; 1e-5 leaves room for the
epilogue's own roundings), float64 1e-12.
"""

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from rescompile import ops
from rescompile.backends.cpu import llvm
from rescompile.backends.cpu.llvm import epilogue, jit
from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.pixelwise import (EltwiseKernel, MaxPoolGradKernel,
                                                    MaxPoolKernel, MeanGradKernel, MeanKernel)
from rescompile.backends.cpu.llvm.pixels import TABLE_BYTES
from rescompile.backends.cpu.llvm.reduce import BatchNormGradApply, ChannelSums, SlotSum
from rescompile.backends.cpu.llvm.wgrad import WgradKernel
from rescompile.backends.cpu.weights import pack_weights
from rescompile.backends.cpu.target import ISAS, generic_target, host_target
from rescompile.backends.cpu.tuning import SUM_BLOCK
from rescompile.padding import pads_2d
from microkernels import (call, close, conv_reference, epilogue_reference, padded,
                          run_eltwise, strides)

TOL = {"float32": 1e-5, "float64": 1e-12}
RUNNABLE = [host_target()] + [generic_target(isa) for isa in ISAS
                              if isa != host_target().isa and generic_target(isa).runs_here()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("objects")


def _operands(rng, steps, first, shape, dtype):
    """Random operands and scalars for epilogue steps numbered from `first`, by the names the
    kernel's signature gives them (a variance positive)."""
    operands, scalars = {}, {}
    for o in epilogue.Chain(tuple(steps), first).operands:
        size = shape if o.kind == epilogue.PIXEL else shape[-1]
        operands[o.role] = (rng.uniform(0.5, 2.0, size) if o.name == "var"
                            else rng.standard_normal(size)).astype(dtype)
    for index, op in enumerate(steps, start=first):
        for name in epilogue.rule(op).scalars:
            scalars[epilogue.scalar_field(index, name)] = {"alpha": 0.1, "epsilon": 1e-3}[name]
    return operands, scalars


CONV_CASES = [
    # (n, h, w, cin, cout, k, stride, pads, epilogue, out2)
    (2, 7, 5, 6, 10, 3, 1, (1, 1, 1, 1), ("bias_add", "relu"), None),
    (3, 8, 8, 5, 7, 3, 2, (0, 1, 0, 1), ("add",), ("affine", "relu")),
    (2, 10, 11, 3, 8, 7, 2, (2, 3, 3, 3), (), None),
    (2, 6, 5, 17, 33, 1, 1, (0, 0, 0, 0), ("bias_add", "add", "relu"), None),
    (2, 9, 9, 8, 40, 1, 2, (0, 0, 0, 0), ("batch_normalize", "relu"), ("affine",)),
    (5, 1, 1, 20, 10, 1, 1, (0, 0, 0, 0), ("bias_add",), None),  # a dense layer
]


@pytest.mark.parametrize("panels_outer", [0, 1], ids=["tiles-outer", "panels-outer"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[4]}")
def test_conv_kernel_matches_numpy(case, dtype, panels_outer, cache_dir):
    n, h, w, cin, cout, k, stride, pads, steps, out2 = case
    kernel = ConvKernel(dtype, host_target(), steps, out2)
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x = rng.standard_normal((n, h, w, cin)).astype(dtype)
    weights = rng.standard_normal((k, k, cin, cout)).astype(dtype)
    y = conv_reference(x, weights, stride, pads)
    operands, scalars = _operands(rng, steps, 0, y.shape, dtype)
    more, more_scalars = _operands(rng, out2 or (), len(steps), y.shape, dtype)
    operands.update(more)
    scalars.update(more_scalars)
    expected = epilogue_reference(steps, 0, y, operands, scalars)
    expected2 = epilogue_reference(out2 or (), len(steps), expected, operands, scalars)
    xp = padded(x, pads)
    out = np.full(y.shape, np.nan, dtype)
    out2_array = np.full(y.shape, np.nan, dtype)
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=y.shape[1], ow=y.shape[2],
                  panels_outer=panels_outer, **strides("x", xp),
                  **strides("out", out), **strides("out2", out2_array), **scalars)
    for name, array in operands.items():
        if array.ndim == 4:
            fields.update(strides(name, array))
    pointers = dict(x=xp, w=pack_weights(weights, kernel.nr), out=out, out2=out2_array,
                    **operands)
    pixels = n * y.shape[1] * y.shape[2]
    call(kernel, fields, pointers, (0, pixels), (0, cout), cache_dir)
    assert close(out, expected) < TOL[dtype]
    if out2 is not None:
        assert close(out2_array, expected2) < TOL[dtype]


def test_conv_kernel_covers_exactly_its_pixel_and_channel_range(cache_dir):
    """A call's pixels may start mid-row and mid-tile and span images; its channels start at a
    panel and may end mid-panel: everything else stays untouched."""
    kernel = ConvKernel("float32", host_target(), ("bias_add",))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
    weights = rng.standard_normal((3, 3, 6, 40)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    pads = (1, 1, 1, 1)
    expected = conv_reference(x, weights, 1, pads) + bias
    out = np.full(expected.shape, np.nan, np.float32)
    fields = dict(cin=6, kh=3, kw=3, stride=1, oh=5, ow=4, panels_outer=1,
                  **strides("x", padded(x, pads)), **strides("out", out))
    pointers = {"x": padded(x, pads), "w": pack_weights(weights, kernel.nr), "out": out,
                "e0.bias": bias}
    p0, p1, c0, c1 = 7, 43, kernel.nr, 37
    call(kernel, fields, pointers, (p0, p1), (c0, c1), cache_dir)
    flat, ref = out.reshape(-1, 40), expected.reshape(-1, 40)
    assert close(flat[p0:p1, c0:c1], ref[p0:p1, c0:c1]) < 1e-5
    outside = np.ones(flat.shape, bool)
    outside[p0:p1, c0:c1] = False
    assert np.isnan(flat[outside]).all()


def test_conv_kernel_writes_the_interior_of_a_bordered_buffer(cache_dir):
    """A producer writes straight into the next conv's zero-bordered input."""
    kernel = ConvKernel("float64", host_target(), ("relu",))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 6, 4))
    weights = rng.standard_normal((1, 1, 4, 5))
    expected = np.maximum(conv_reference(x, weights, 1, (0,) * 4), 0.25 * conv_reference(
        x, weights, 1, (0,) * 4))
    out = np.zeros((2, 8, 9, 5))  # borders: 1 row above and below, 1 left, 2 right
    interior = out[:, 1:7, 1:7, :]
    fields = dict(cin=4, kh=1, kw=1, stride=1, oh=6, ow=6, panels_outer=0,
                  **strides("x", x),
                  **strides("out", out), **{"e0.alpha": 0.25})
    pointers = {"x": x, "w": pack_weights(weights, kernel.nr),
                "out": out.reshape(-1)[9 * 5 + 5:]}  # the interior's first element
    call(kernel, fields, pointers, (0, 72), (0, 5), cache_dir)
    assert close(interior, expected) < 1e-12
    border = np.ones(out.shape, bool)
    border[:, 1:7, 1:7, :] = False
    assert not out[border].any()


@pytest.mark.parametrize("target", RUNNABLE, ids=lambda t: t.isa)
def test_every_runnable_instruction_set(target, cache_dir):
    """Each variant this CPU can run (the host's, and narrower ones) computes the same conv."""
    kernel = ConvKernel("float32", target, ("add",), ("affine", "relu"))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 7, 9)).astype(np.float32)
    weights = rng.standard_normal((3, 3, 9, 21)).astype(np.float32)
    y = conv_reference(x, weights, 1, (1, 1, 1, 1))
    operands, scalars = _operands(rng, ("add", "affine", "relu"), 0, y.shape, np.float32)
    expected = epilogue_reference(("add",), 0, y, operands, scalars)
    expected2 = epilogue_reference(("affine", "relu"), 1, expected, operands, scalars)
    xp = padded(x, (1, 1, 1, 1))
    out, out2 = np.empty(y.shape, np.float32), np.empty(y.shape, np.float32)
    fields = dict(cin=9, kh=3, kw=3, stride=1, oh=5, ow=7, panels_outer=0,
                  **strides("x", xp),
                  **strides("out", out), **strides("out2", out2), **strides("e0.other", out),
                  **scalars)
    call(kernel, fields, dict(x=xp, w=pack_weights(weights, kernel.nr), out=out, out2=out2,
                              **operands), (0, 70), (0, 21), cache_dir)
    assert close(out, expected) < 1e-5 and close(out2, expected2) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_compiles(isa):
    """Variants this CPU cannot run are still generated and compiled, with their registers."""
    target = generic_target(isa)
    kernel = ConvKernel("float32", target, ("bias_add", "relu"))
    assembly = jit.assembly(kernel.ir(), target)
    register = {"avx512": "zmm", "avx2": "ymm", "portable": "xmm"}[isa]
    assert f"%{register}" in assembly
    assert ("vfmadd" in assembly) == (isa != "portable")
    assert "prefetcht1" in assembly  # panels outer: the next panel's weights, into L2
    assert kernel.nr == {"avx512": 32, "avx2": 16, "portable": 8}[isa]


def test_tile_fills_the_register_file():
    assert (ConvKernel("float32", generic_target("avx2")).mr,
            ConvKernel("float32", generic_target("avx512")).mr) == (6, 14)


ELTWISE_CASES = [
    (("affine", "relu"), ("add",)),
    (("relu_grad", "add"), None),
    (("batch_normalize",), None),
    (("bias_add", "add", "relu"), ("affine", "relu")),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chain", ELTWISE_CASES, ids=lambda c: "_".join(c[0]))
def test_eltwise_kernel(chain, dtype, cache_dir):
    steps, out2 = chain
    kernel = EltwiseKernel(dtype, host_target(), steps, out2)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5, 13)).astype(dtype)
    x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]  # NaN and infinities pass through relu
    operands, scalars = _operands(rng, steps + (out2 or ()), 0, x.shape, dtype)
    expected = epilogue_reference(steps, 0, x.astype(np.float64), operands, scalars)
    expected2 = epilogue_reference(out2 or (), len(steps), expected, operands, scalars)
    out, out2_array = np.empty_like(x), np.empty_like(x)
    run_eltwise(kernel, x, out, out2_array, operands, scalars, cache_dir)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert close(out[finite], expected[finite]) < TOL[dtype]
    if out2 is not None:
        finite2 = np.isfinite(expected2)
        assert close(out2_array[finite2], expected2[finite2]) < TOL[dtype]


def test_copy_into_a_bordered_buffer_keeps_the_border(cache_dir):
    kernel = EltwiseKernel("float32", host_target())
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 3)).astype(np.float32)
    out = np.zeros((2, 5, 6, 3), np.float32)
    fields = dict(oh=3, ow=4, **strides("x", x), **strides("out", out))
    call(kernel, fields, {"x": x, "out": out.reshape(-1)[6 * 3 + 3:]}, (0, 24), (0, 3),
         cache_dir)
    np.testing.assert_array_equal(out[:, 1:4, 1:5], x)
    assert out.sum() == x.sum() and not out[:, 0].any() and not out[:, :, 5].any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_max_pool_kernel(dtype, cache_dir):
    kernel = MaxPoolKernel(dtype, host_target())
    x = np.random.default_rng(8).standard_normal((2, 9, 8, 11)).astype(dtype)
    x[1, 4, 4, 2] = np.nan
    for padding in ("same", "symmetric"):
        attrs = {"k": 3, "stride": 2, "padding": padding}
        (expected,) = ops.get("max_pool").run_reference(attrs, x)
        top, _, left, _ = pads_2d(9, 8, 3, 2, padding)
        out = np.empty(expected.shape, dtype)
        fields = dict(k=3, stride=2, pad_top=top, pad_left=left, h=9, w=8, oh=out.shape[1],
                      ow=out.shape[2], **strides("x", x), **strides("out", out))
        call(kernel, fields, {"x": x, "out": out}, (0, out.size // 11), (0, 11), cache_dir)
        np.testing.assert_array_equal(out, expected)  # a max rounds nothing


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mean_kernel(dtype, cache_dir):
    kernel = MeanKernel(dtype, host_target())
    x = np.random.default_rng(9).standard_normal((3, 5, 7, 19)).astype(dtype)
    out = np.empty((3, 19), dtype)
    fields = dict(h=5, w=7, **strides("x", x), **strides("out", out))
    call(kernel, fields, {"x": x, "out": out}, (0, 3), (0, 19), cache_dir)
    assert close(out, x.astype(np.float64).mean(axis=(1, 2))) < TOL[dtype]


def test_object_cache_is_keyed_by_cpu_and_rebuilds_a_corrupt_entry(tmp_path):
    kernel = ConvKernel("float64", host_target(), ("bias_add",))
    key = jit.cache_key(kernel)
    other_cpu = ConvKernel("float64", host_target().__class__("avx2", "haswell", ""),
                           ("bias_add",))
    other_steps = ConvKernel("float64", host_target(), ("bias_add", "relu"))
    assert len({key, jit.cache_key(other_cpu), jit.cache_key(other_steps)}) == 3
    script = textwrap.dedent(f"""
        from rescompile.backends.cpu.llvm import epilogue, jit
        from rescompile.backends.cpu.llvm.conv import ConvKernel
        from rescompile.backends.cpu.target import host_target
        k = ConvKernel("float64", host_target(), ("bias_add",))
        print(jit.address(k, {str(tmp_path)!r}) != 0)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = lambda: subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=120, check=True).stdout.strip()
    assert run() == "True"
    (entry,) = (tmp_path / "objects").glob("*.o")
    assert entry.name == f"{key}.o"
    entry.write_bytes(entry.read_bytes()[:100])  # torn
    assert run() == "True" and len(entry.read_bytes()) > 100  # rebuilt, not loaded


def test_object_cache_key_covers_every_module_the_generators_use():
    """A kernel's IR is a function of the generator's modules and of the ops whose formulas it
    computes (ops/norm.py's batch norm): each of their sources is in the key, so an edited
    formula is never served from a stale object. jit's own cache plumbing makes no IR."""
    sources = set(jit.generator_sources())
    plumbing = {"rescompile.kernel_cache", "rescompile.errors"}
    used = set()
    for info in pkgutil.iter_modules(llvm.__path__):
        module = importlib.import_module(f"{llvm.__name__}.{info.name}")
        for value in vars(module).values():
            home = value if inspect.ismodule(value) else inspect.getmodule(value)
            if home is not None and home.__name__.startswith("rescompile") and \
                    home.__name__ not in plumbing and hasattr(home, "__file__"):
                used.add(Path(home.__file__))
    assert Path(ops.norm.__file__) in used  # the check sees the formulas the kernels call
    assert used - sources == set()


# --- training kernels ------------------------------------------------------------------------

def _chunked(kernel, fields, pointers, pixels, channels, chunk, cache_dir):
    """One call per fixed chunk of pixels, as the driver makes them for a reduction."""
    for start in range(0, pixels, chunk):
        call(kernel, fields, pointers, (start, min(pixels, start + chunk)), channels, cache_dir)


def _combine(dtype, partial, slots, width, rows, mode, images, pixels, cache_dir):
    kernel = SlotSum(dtype, host_target(), rows, mode)
    outs = [np.empty(width, dtype) for _ in range(rows)]
    fields = dict(slots=slots, width=width, images=images, pixels=pixels)
    call(kernel, fields, {"partial": partial, **{f"out{r}": o for r, o in enumerate(outs)}},
         (0, 1), (0, width), cache_dir)
    return outs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_statistics_over_fixed_chunks(dtype, cache_dir):
    """The conv's output statistics, chunk by chunk into float64 slots, then combined: the
    mean and biased variance of batch_moments. Whatever the tile (MR 3, 5 or the derived
    one), the slots are bit for bit a standalone sums kernel's over the stored output: both
    sum the same blocks of pixels (`slots.BlockSums`), one ending inside the first chunk."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 6, 7, 5)).astype(dtype)
    weights = rng.standard_normal((3, 3, 5, 20)).astype(dtype)
    residual = (rng.standard_normal((3, 6, 7, 20)) + 2.0).astype(dtype)
    y = conv_reference(x, weights, 1, (1, 1, 1, 1)) + residual
    chunk, pixels = 100, 3 * 42
    assert SUM_BLOCK < chunk
    slots = -(-pixels // chunk)
    xp = padded(x, (1, 1, 1, 1))
    for mr in (0, 3, 5):
        kernel = ConvKernel(dtype, host_target(), ("add",), mr=mr, sums="batch_moments")
        out = np.empty(y.shape, dtype)
        partial = np.full(slots * 2 * 20, np.nan)
        fields = dict(cin=5, kh=3, kw=3, stride=1, oh=6, ow=7, panels_outer=0,
                      **strides("x", xp), **strides("out", out), **strides("e0.other", residual),
                      **{"sums.chunk": chunk, "sums.width": 20})
        _chunked(kernel, fields, {"x": xp, "w": pack_weights(weights, kernel.nr), "out": out,
                                  "e0.other": residual, "sums": partial,
                                  "scratch": np.full(2 * 20, np.nan, dtype)},
                 pixels, (0, 20), chunk, cache_dir)
        assert close(out, y) < TOL[dtype]
        standalone = np.full(slots * 2 * 20, np.nan)
        _chunked(ChannelSums(dtype, host_target(), "batch_moments"),
                 dict(oh=6, ow=7, chunk=chunk, width=20, **strides("x", out)),
                 {"x": out, "partial": standalone}, pixels, (0, 20), chunk, cache_dir)
        np.testing.assert_array_equal(partial, standalone, err_msg=f"MR {kernel.mr}")
    mean, var = _combine(dtype, partial, slots, 20, 2, "moments", 3, 42, cache_dir)
    ref_mean, ref_var = ops.get("batch_moments").run_reference({}, y)
    assert close(mean, ref_mean) < TOL[dtype] and close(var, ref_var) < TOL[dtype]


# 11 channels; 1501, more than one block of the apply kernel's per-channel table (five
# vectors a channel at least) and a partial vector, its calls cut at channel 700.
BN_CHANNELS = {11: ((0, 11),), 1501: ((0, 700), (700, 1501))}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels", sorted(BN_CHANNELS))
def test_batch_norm_gradient_kernels(channels, relu, dtype, cache_dir):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 6, channels)).astype(dtype)
    dr = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.normal(0, 0.3, channels).astype(dtype)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    attrs = {"epsilon": 1e-3, "alpha": 0.1}
    if relu:
        ref = ops.get("batch_norm_relu_grad").run_reference(attrs, dr, x, gamma, beta, mean, var)
    else:
        ref = ops.get("batch_norm_grad").run_reference(attrs, dr, x, gamma, mean, var)
    halves = "batch_norm_relu_grad" if relu else "batch_norm_grad"
    pointers = {"dy": dr, "x": x, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    fields = dict(oh=5, ow=6, epsilon=1e-3, alpha=0.1, chunk=16, width=channels,
                  **strides("dy", dr), **strides("x", x))
    partial = np.full(4 * 2 * channels, np.nan)
    _chunked(ChannelSums(dtype, host_target(), f"{halves}_sums"), fields,
             dict(pointers, partial=partial), 60, (0, channels), 16, cache_dir)
    dbeta, dgamma = _combine(dtype, partial, 4, channels, 2, "sums", 2, 30, cache_dir)
    assert close(dgamma, ref[1]) < TOL[dtype] and close(dbeta, ref[2]) < TOL[dtype]
    dx = np.full_like(x, np.nan)
    kernel = BatchNormGradApply(dtype, host_target(), f"{halves}_apply")
    for cut in BN_CHANNELS[channels]:
        call(kernel, dict(fields, images=2, **strides("out", dx)),
             dict(pointers, dgamma=dgamma, dbeta=dbeta, out=dx), (0, 60), cut, cache_dir)
    assert close(dx, ref[0]) < TOL[dtype]
    assert len(BN_CHANNELS[channels]) == 1 or channels * 5 * x.itemsize > TABLE_BYTES


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moments_kernel(dtype, cache_dir):
    x = (np.random.default_rng(12).standard_normal((3, 4, 5, 9)) * 2 + 5).astype(dtype)
    partial = np.full(3 * 2 * 9, np.nan)
    fields = dict(oh=4, ow=5, chunk=25, width=9, **strides("x", x))
    _chunked(ChannelSums(dtype, host_target(), "batch_moments"), fields,
             {"x": x, "partial": partial},
             60, (0, 9), 25, cache_dir)
    mean, var = _combine(dtype, partial, 3, 9, 2, "moments", 3, 20, cache_dir)
    ref_mean, ref_var = ops.get("batch_moments").run_reference({}, x)
    # The variance is E[x^2] - mean^2 from float64 sums; with mean 5 and std 2 that cancels
    # about (25 + 4) / 4 = 7x of the sums' relative error, hence 10x the mean's bound.
    assert close(mean, ref_mean) < TOL[dtype] and close(var, ref_var) < 10 * TOL[dtype]


WGRAD_CASES = [
    # (n, h, w, cin, cout, k, stride, pads)
    (2, 7, 6, 5, 20, 3, 1, (1, 1, 1, 1)),
    (3, 8, 8, 6, 10, 3, 2, (0, 1, 0, 1)),
    (2, 9, 9, 17, 33, 1, 1, (0, 0, 0, 0)),
    (1, 10, 11, 3, 8, 7, 2, (2, 3, 3, 3)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", WGRAD_CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[4]}")
def test_weight_gradient_kernel(case, dtype, cache_dir):
    """Chunks of pixels into float64 slots, each chunk's channels in two calls, combined."""
    n, h, w, cin, cout, k, stride, pads = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x = rng.standard_normal((n, h, w, cin)).astype(dtype)
    xp = padded(x, pads)
    oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    dy = rng.standard_normal((n, oh, ow, cout)).astype(dtype)
    expected = np.zeros((k, k, cin, cout))
    for i in range(k):
        for j in range(k):
            taps = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            expected[i, j] = np.einsum("nhwc,nhwo->co", taps.astype(np.float64), dy)
    kernel = WgradKernel(dtype, host_target())
    pixels, chunk = n * oh * ow, 23
    slots = -(-pixels // chunk)
    depth = k * k * cin
    partial = np.full(slots * depth * cout, np.nan)
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow, chunk=chunk, width=cout,
                  **strides("x", xp), **strides("dy", dy))
    split = kernel.nr if cout > kernel.nr else cout
    for start in range(0, pixels, chunk):
        for channels in ((0, split), (split, cout)):
            if channels[0] < channels[1]:
                call(kernel, fields, {"x": xp, "dy": dy, "partial": partial},
                     (start, min(pixels, start + chunk)), channels, cache_dir)
    (dw,) = _combine(dtype, partial, slots, depth * cout, 1, "sums", 1, 1, cache_dir)
    assert close(dw.reshape(expected.shape), expected) < TOL[dtype]


def test_mean_gradient_kernel(cache_dir):
    dy = np.random.default_rng(13).standard_normal((3, 10)).astype(np.float32)
    (expected,) = ops.get("global_avg_pool_grad").run_reference({"in_hw": (4, 5)}, dy)
    out = np.empty((3, 4, 5, 10), np.float32)
    call(MeanGradKernel("float32", host_target()),
         dict(oh=4, ow=5, **strides("dy", dy), **strides("out", out)), {"dy": dy, "out": out},
         (0, 60), (0, 10), cache_dir)
    np.testing.assert_allclose(out, expected, rtol=1e-7)  # one float32 division: half an ulp


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_max_pool_gradient_kernel(padding, cache_dir):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 9, 8, 11))
    x[0, 2, 2, :4] = x[0, 2, 3, :4]  # ties: the first maximum takes the gradient
    attrs = {"k": 3, "stride": 2, "padding": padding}
    (y,) = ops.get("max_pool").run_reference(attrs, x)
    dy = rng.standard_normal(y.shape)
    (expected,) = ops.get("max_pool_grad").run_reference(attrs, dy, x)
    top, _, left, _ = pads_2d(9, 8, 3, 2, padding)
    out = np.full(x.shape, np.nan)
    fields = dict(k=3, stride=2, pad_top=top, pad_left=left, h=9, w=8, oh=y.shape[1],
                  ow=y.shape[2], **strides("dy", dy), **strides("x", x), **strides("out", out))
    call(MaxPoolGradKernel("float64", host_target()), fields, {"dy": dy, "x": x, "out": out},
         (0, 144), (0, 11), cache_dir)
    assert close(out, expected) < 1e-12


def test_barrier_holds_threads_together_when_one_is_late():
    """The barrier lets no thread through before every thread arrived, round after round,
    also when one thread arrives late enough that the other stops spinning and sleeps."""
    import threading
    import time
    import ctypes
    from rescompile.backends.cpu.llvm.sync import SLEEP_NS, SPINS_BEFORE_SLEEP, STATE_WORDS, \
        Barrier
    wait = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_int64)(jit.address(Barrier(host_target())))
    state = np.zeros(STATE_WORDS, np.int64)
    rounds, reached, behind = 60, [0, 0], []

    def run(me: int) -> None:
        for k in range(rounds):
            if me == 1:
                time.sleep(0.002)  # the other thread spins out and sleeps on the futex
            reached[me] = k + 1
            wait(state.ctypes.data, 2, SPINS_BEFORE_SLEEP, SLEEP_NS)
            if reached[1 - me] < k + 1:
                behind.append((me, k))

    threads = [threading.Thread(target=run, args=(me,)) for me in (0, 1)]
    wall, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert reached == [rounds, rounds] and behind == []
    assert state[0] == 0 and state[16] == 0 and state[8] == rounds  # none left asleep
    # the early thread slept through the late one's naps instead of spinning or yielding
    assert cpu < wall / 2, (cpu, wall)
