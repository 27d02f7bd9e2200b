"""The CPU micro-kernels with bfloat16 tensors, against the bfloat16 reference: NumPy in
float64 on the bfloat16 values, rounded to bfloat16 where the kernel stores (its outputs, and
the first output before out2 and the sums are made of it).

Every variant this CPU runs: float32 FMAs on bfloat16 storage for AVX-512 (without its
extensions), AVX2 and the portable SSE2 set; vdpbf16ps where the host has AVX512-BF16; and the
AMX kernel with its tile instructions emulated in vector code (vdpbf16ps), which runs its
staging, weight layout and epilogue here. The real AMX kernel is generated for a target that
has AMX and its assembly checked; it never runs on a host without AMX.

Tolerances, relative to the expected tensor's max: 1e-2 for a conv's outputs. A stored output
is its float32 value rounded to bfloat16, off by at most half an ulp (2^-9 of itself), and the
float32 sum it is rounded from differs from the float64 reference in its last bits, which can
move a value across a rounding boundary: one ulp, 2^-8 = 3.9e-3. `out2` (and an epilogue step
scaling by up to 2) doubles that: 7.8e-3. Sums and outputs of the compute type (float32) made
of stored values are held to 1e-5, the float32 kernels' bound: they round nothing.
"""

import re
import zlib
from dataclasses import replace

import numpy as np
import pytest

from rescompile import ops
from rescompile.backends.cpu.llvm import epilogue, jit
from rescompile.backends.cpu.llvm.amx import AmxConvKernel
from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.pixelwise import EltwiseKernel, MeanGradKernel, MeanKernel
from rescompile.backends.cpu.llvm.reduce import BatchNormGradApply, ChannelSums, SlotSum
from rescompile.backends.cpu.llvm.wgrad import WgradKernel, slab_rows
from rescompile.backends.cpu.target import generic_target, host_target, target_for
from rescompile.backends.cpu.tuning import AMX_TILE, WGRAD_BLOCK, conv_tile
from rescompile.backends.cpu.weights import pack_weights
from rescompile.precision import numpy_dtype, round_bf16
from microkernels import (call, close, conv_reference, epilogue_reference, padded,
                          run_eltwise, strides)
from test_cpu_microkernels import CONV_CASES, _operands

BF16 = "bfloat16"
TOL = 1e-2  # a conv's bfloat16 outputs (see above)
F32_TOL = 1e-5  # what is not rounded to bfloat16
HOST = host_target()
HAS_BF16 = HOST.has("avx512_bf16")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="the host has no AVX512-BF16")


def _fma_targets():
    """FMA variants this host runs: its vector ISA without extensions, and narrower ones."""
    targets = [target_for(HOST.isa)]
    for isa in ("avx2", "portable"):
        target = generic_target(isa)
        if isa != HOST.isa and target.runs_here():
            targets.append(target)
    return targets


# (name, kernel class, target, dot, extra keywords): every conv variant this host runs
VARIANTS = [(f"fma-{t.isa}", ConvKernel, t, "fma", {}) for t in _fma_targets()]
if HAS_BF16:
    VARIANTS += [("dpbf16", ConvKernel, HOST, "dpbf16", {}),
                 ("amx-emulated", AmxConvKernel, HOST, "amx", {"emulated": True})]
# the FMA kernels a 1 x 1 conv lowers to: its rows staged widened (`ConvKernel.stages_rows`)
STAGED = [(f"fma-{t.isa}-staged", ConvKernel, t, "fma", {"stages_rows": True})
          for t in _fma_targets()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bf16-objects")


def bf16(array) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # a NaN casts to a NaN, as it should
        return np.asarray(array, np.float32).astype(numpy_dtype(BF16))


def stored(array) -> np.ndarray:
    """float64 values as a bfloat16 store leaves them."""
    return round_bf16(np.asarray(array, np.float32)).astype(np.float64)


def _conv_kernel(variant, steps, out2, cout, sums=None, prologue=()):
    """The conv kernel of a variant as the lowering types a bfloat16 model's: every per-pixel
    tensor bfloat16, per-channel operands float32, the weights bfloat16 for the pair
    kernels and float32 holding bfloat16 values for the FMA ones."""
    _, cls, target, dot, extra = variant
    tile = AMX_TILE if dot == "amx" else conv_tile(target, "float32", cout)
    kernel = cls("float32", target, steps, out2, *tile, sums=sums, dot=dot, prologue=prologue,
                 **extra)
    pixels = {"x", *kernel.outputs, *kernel.sum_against} | ({"w"} if dot != "fma" else set())
    pixels |= {o.role for chain in kernel.chains for o in chain.operands
               if o.kind == epilogue.PIXEL}
    roles = {p.role for p in kernel.signature.pointers}
    return cls("float32", target, steps, out2, *tile, sums=sums, dot=dot, prologue=prologue,
               storage=tuple(sorted((r, BF16) for r in pixels & roles)), **extra)


def _layout(kernel) -> str:
    return {"fma": "", "dpbf16": "vnni2", "amx": "amx"}[kernel.dot]


def _packed(weights, kernel):
    return pack_weights(round_bf16(weights), kernel.nr, None, kernel.weight_type,
                        _layout(kernel))


@pytest.mark.parametrize("variant", VARIANTS + STAGED, ids=lambda v: v[0])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[4]}")
def test_conv_kernel_against_the_bf16_reference(case, variant, cache_dir):
    """Odd sizes (pixels, channels, depth), strides 1 and 2, 1x1 to 7x7, every epilogue step,
    out2: the kernel against float64 on the bfloat16 inputs and weights, rounded where it
    stores. An odd input channel count takes FMAs in the lowering; the pair kernels still
    compute it here when the depth of a window row is even. A 1 x 1 conv's FMA kernel also
    with its rows staged widened, as the lowering makes it."""
    n, h, w, cin, cout, k, stride, pads, steps, out2 = case
    kernel = _conv_kernel(variant, steps, out2, cout)
    if kernel.dot == "dpbf16" and (k * cin) % 2:
        pytest.skip("vdpbf16ps needs pairs of inputs in each window row (lowering: FMAs)")
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x = stored(rng.standard_normal((n, h, w, cin)))
    weights = stored(rng.standard_normal((k, k, cin, cout)))
    y = conv_reference(x, weights, stride, pads)
    operands, scalars = _operands(rng, tuple(steps) + tuple(out2 or ()), 0, y.shape,
                                  np.float32)
    operands = {r: bf16(a) if a.ndim == 4 else a for r, a in operands.items()}
    as64 = {r: a.astype(np.float64) for r, a in operands.items()}
    expected = stored(epilogue_reference(steps, 0, y, as64, scalars))
    expected2 = epilogue_reference(out2 or (), len(steps), expected, as64, scalars)
    xp = bf16(padded(x, pads))
    out = bf16(np.full(y.shape, np.nan))
    out2_array = bf16(np.full(y.shape, np.nan))
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=y.shape[1], ow=y.shape[2],
                  panels_outer=0, **strides("x", xp), **strides("out", out),
                  **strides("out2", out2_array), **scalars)
    for name, array in operands.items():
        if array.ndim == 4:
            fields.update(strides(name, array))
    pointers = dict(x=xp, w=_packed(weights, kernel), out=out, out2=out2_array, **operands)
    if kernel.stages_rows:
        fields.update(kernel.scratch_fields(fields, cout))
        pointers["scratch"] = np.full(kernel.scratch_for(fields, cout) // 4, np.nan, np.float32)
    call(kernel, fields, pointers, (0, n * y.shape[1] * y.shape[2]), (0, cout), cache_dir)
    assert close(out.astype(np.float32), expected) < TOL
    if out2 is not None:
        assert close(out2_array.astype(np.float32), expected2) < TOL


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_conv_statistics_are_of_the_stored_output(variant, cache_dir):
    """A conv's batch statistics are the moments of its output as stored (as the reference's
    batch_moments reads the stored tensor), summed in float32 and float64: 1e-5."""
    kernel = _conv_kernel(variant, ("add",), None, 20, sums="batch_moments")
    rng = np.random.default_rng(10)
    x = stored(rng.standard_normal((3, 6, 7, 6)))
    weights = stored(rng.standard_normal((3, 3, 6, 20)))
    residual = bf16(rng.standard_normal((3, 6, 7, 20)) + 2.0)
    out = bf16(np.zeros((3, 6, 7, 20)))
    chunk, pixels = 64, 3 * 42
    slots = -(-pixels // chunk)
    partial = np.full(slots * 2 * 20, np.nan)
    xp = bf16(padded(x, (1, 1, 1, 1)))
    fields = dict(cin=6, kh=3, kw=3, stride=1, oh=6, ow=7, panels_outer=0,
                  **strides("x", xp),
                  **strides("out", out), **strides("e0.other", residual),
                  **{"sums.chunk": chunk, "sums.width": 20})
    pointers = {"x": xp, "w": _packed(weights, kernel), "out": out, "e0.other": residual,
                "sums": partial, "scratch": np.full(2 * 20, np.nan, np.float32)}
    for start in range(0, pixels, chunk):
        call(kernel, fields, pointers, (start, min(pixels, start + chunk)), (0, 20), cache_dir)
    y = conv_reference(x, weights, 1, (1, 1, 1, 1)) + residual.astype(np.float64)
    assert close(out.astype(np.float32), y) < TOL
    combine = SlotSum("float32", HOST, 2, "moments")
    mean, var = np.empty(20, np.float32), np.empty(20, np.float32)
    call(combine, dict(slots=slots, width=20, images=3, pixels=42),
         {"partial": partial, "out0": mean, "out1": var}, (0, 1), (0, 20), cache_dir)
    ref_mean, ref_var = ops.get("batch_moments").run_reference({}, out.astype(np.float64))
    assert close(mean, ref_mean) < F32_TOL and close(var, ref_var) < F32_TOL


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_conv_prologue_against_the_bf16_reference(variant, cache_dir):
    """A 1 x 1 conv (stride 2; 10 input channels, a masked tail on every vector width) that
    reads its input through a batch norm and ReLU (`fuse_prologues`), with a residual add
    and its statistics, so the scratch holds both the running block sums and the staged rows:
    against float64 on the activation as a bfloat16 tensor stores it (1e-2, the output's
    rounding; an activation a float32 rounding moves across a bfloat16 tie is one unit of
    2^-8 in a sum of 10), and the statistics of the stored output."""
    prologue = ("batch_normalize", "relu")
    kernel = _conv_kernel(variant, ("add",), None, 20, sums="batch_moments", prologue=prologue)
    rng = np.random.default_rng(11)
    x = bf16(rng.standard_normal((2, 9, 9, 10)))
    weights = stored(rng.standard_normal((1, 1, 10, 20)))
    residual = bf16(rng.standard_normal((2, 5, 5, 20)))
    operands, scalars = _operands(rng, prologue, 1, x.shape, np.float32)
    activated = stored(epilogue_reference(prologue, 1, x.astype(np.float64),
                                          operands, scalars))
    y = conv_reference(activated, weights, 2, (0, 0, 0, 0)) + residual.astype(np.float64)
    out = bf16(np.full(y.shape, np.nan))
    partial = np.full(2 * 20, np.nan)
    fields = dict(cin=10, kh=1, kw=1, stride=2, oh=5, ow=5, panels_outer=0,
                  **strides("x", x), **strides("out", out), **strides("e0.other", residual),
                  **scalars, **{"sums.chunk": 64, "sums.width": 20})
    fields.update(kernel.scratch_fields(fields, 20))
    pointers = {"x": x, "w": _packed(weights, kernel), "out": out, "e0.other": residual,
                "sums": partial, **operands,
                "scratch": np.full(kernel.scratch_for(fields, 20) // 4, np.nan, np.float32)}
    call(kernel, fields, pointers, (0, 50), (0, 20), cache_dir)
    assert close(out.astype(np.float32), stored(y)) < TOL
    combine = SlotSum("float32", HOST, 2, "moments")
    mean, var = np.empty(20, np.float32), np.empty(20, np.float32)
    call(combine, dict(slots=1, width=20, images=2, pixels=25),
         {"partial": partial, "out0": mean, "out1": var}, (0, 1), (0, 20), cache_dir)
    ref_mean, ref_var = ops.get("batch_moments").run_reference({}, out.astype(np.float64))
    assert close(mean, ref_mean) < F32_TOL and close(var, ref_var) < F32_TOL


@pytest.mark.parametrize("nan", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_conv_prologue_keeps_a_nan_a_nan(variant, nan, cache_dir):
    """The staged rows' roundings are checked once a vector of channels (`rounded_once`): a
    NaN the unguarded integer rounding would carry into a zero (0x7FFFFFFF to -0,
    0xFFFFFFFF to +0), made by the prologue's shift in one input channel, reaches the
    multiply-adds as a NaN, so every output is NaN, as in the reference."""
    prologue = ("affine", "relu")
    kernel = _conv_kernel(variant, ("bias_add",), None, 20, prologue=prologue)
    rng = np.random.default_rng(12)
    x = bf16(rng.standard_normal((2, 3, 5, 10)))
    weights = stored(rng.standard_normal((1, 1, 10, 20)))
    operands, scalars = _operands(rng, prologue, 1, x.shape, np.float32)
    more, _ = _operands(rng, ("bias_add",), 0, x.shape[:3] + (20,), np.float32)
    scale, shift = (next(r for r in operands if r.endswith(n)) for n in (".scale", ".shift"))
    operands[scale][3], operands[shift][3] = 0.0, np.uint32(nan).view(np.float32)
    out = bf16(np.zeros(x.shape[:3] + (20,)))
    fields = dict(cin=10, kh=1, kw=1, stride=1, oh=3, ow=5, panels_outer=0,
                  **strides("x", x), **strides("out", out), **scalars)
    fields.update(kernel.scratch_fields(fields, 20))
    pointers = {"x": x, "w": _packed(weights, kernel), "out": out, **operands, **more,
                "scratch": np.zeros(kernel.scratch_for(fields, 20) // 4, np.float32)}
    call(kernel, fields, pointers, (0, 30), (0, 20), cache_dir)
    assert np.isnan(out.astype(np.float32)).all()


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512+avx512_bf16"])
def test_a_kernel_without_sums_checks_its_roundings_once_a_call(isa):
    """Generated, not run: a conv kernel rounding the fast way gathers every tile row's
    suspects in one probe for the call and, where it took one, calls its exact twin (tiles
    of one row, internal), so no tile row branches; a kernel with block sums, which a call
    made twice would add twice, checks each tile row; one rounding by vcvtneps2bf16 with
    denormals flushed checks nothing."""
    target = generic_target(isa)
    variant = (isa, ConvKernel, target, "fma", {})
    for sums in (None, "batch_moments"):
        kernel = _conv_kernel(variant, ("bias_add", "relu"), None, 32, sums=sums)
        text = kernel.ir()
        twins = re.findall(r'define internal void @"?([\w.]+\.exact)"?', text)
        row_checks = len(re.findall(r'%"?any_suspect[\w.]*"? = icmp', text))
        if target.has("avx512_bf16"):
            assert (twins, row_checks) == ([], 0)
        elif sums:  # each row of both loop orders' epilogues, of a whole and a masked panel
            assert twins == [] and row_checks == 4 * kernel.mr
        else:
            twin = replace(kernel, mr=1)
            assert twins == [f"{twin.symbol}.exact"] and row_checks == 1
            assert len(re.findall(rf'call void @"?{re.escape(twins[0])}"?\(', text)) == 1


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_a_masked_panel_moves_its_bfloat16_words_in_pairs(isa):
    """Generated, not run: where the target has no masked move of 16-bit words (SSE2, AVX2),
    a panel's last channels move as masked 32-bit pairs and one last word, never a word at
    a time behind a branch each; AVX-512 moves words under a mask itself. (The kernels over
    odd channel counts, run above, check the words moved.)"""
    target = generic_target(isa)
    kernel = _conv_kernel((isa, ConvKernel, target, "fma", {}), ("bias_add", "add", "relu"),
                          None, 33)
    text = kernel.ir()
    words = len(re.findall(r"call .*@\"?llvm\.masked\.(?:load|store)\.v\d+i16", text))
    pairs = len(re.findall(r"call .*@\"?llvm\.masked\.(?:load|store)\.v\d+i32", text))
    if isa == "avx512":
        assert words > 0 and pairs == 0
    else:
        assert words == 0 and pairs > 0
        # the epilogue's residual loads and output stores of both vectors of a masked panel
        assert pairs >= 2 * 2 * kernel.nv


ELTWISE = [(("affine", "relu"), ("add",)), (("relu_grad", "add"), None),
           (("batch_normalize",), None), (("bias_add", "add", "relu"), ("affine", "relu"))]


@pytest.mark.parametrize("target", _fma_targets(), ids=lambda t: t.isa)
@pytest.mark.parametrize("chain", ELTWISE, ids=lambda c: "_".join(c[0]))
def test_eltwise_kernel(chain, target, cache_dir):
    """bfloat16 in, out and pixel operands, per-channel operands float32; out2 is made of
    out as stored."""
    steps, out2 = chain
    storage = {"x": BF16, "out": BF16, "out2": BF16}
    rng = np.random.default_rng(6)
    x = bf16(rng.standard_normal((3, 4, 5, 13)))
    operands, scalars = _operands(rng, steps + (out2 or ()), 0, x.shape, np.float32)
    operands = {r: bf16(a) if a.ndim == 4 else a for r, a in operands.items()}
    storage.update({r: BF16 for r, a in operands.items() if a.ndim == 4})
    kernel = EltwiseKernel("float32", target, steps, out2)
    roles = {p.role for p in kernel.signature.pointers}
    kernel = EltwiseKernel("float32", target, steps, out2,
                           storage=tuple(sorted((r, t) for r, t in storage.items()
                                                if r in roles)))
    as64 = {r: a.astype(np.float64) for r, a in operands.items()}
    expected = stored(epilogue_reference(steps, 0, x.astype(np.float64), as64, scalars))
    expected2 = epilogue_reference(out2 or (), len(steps), expected, as64, scalars)
    out, out2_array = bf16(np.zeros(x.shape)), bf16(np.zeros(x.shape))
    run_eltwise(kernel, x, out, out2_array, operands, scalars, cache_dir)
    assert close(out.astype(np.float32), expected) < TOL
    if out2 is not None:
        assert close(out2_array.astype(np.float32), expected2) < TOL


SPECIAL_BIASES = np.array([0x7FFFFFFF, 0x7F800001, 0xFFFFFFFF, 0xFFC00001, 0x7F800000,
                           0xFF800000, 0x7F7FFFFF, 0x00000001, 0x80400000], np.uint32)


@pytest.mark.parametrize("sums", [None, "batch_moments"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_conv_epilogue_rounds_special_values(variant, sums, cache_dir):
    """A tile row's outputs are rounded the fast way and checked once (`rounded_once`), with
    sums and without: a NaN whose payload would carry into the exponent of the unguarded
    integer rounding, and a signalling NaN, stay NaN;
    infinities stay infinite; the largest finite value rounds to infinity; a denormal rounds
    as ml_dtypes rounds it. Where the kernel rounds by vcvtneps2bf16 it runs with MXCSR's
    denormals-are-zero and flush-to-zero instead: its arithmetic reads a denormal as zero (so
    the instruction meets none), and the caller gets its MXCSR back. Every other output is
    the reference's, within TOL."""
    n, h, w, cin, cout = 2, 3, 5, 4, 32
    kernel = _conv_kernel(variant, ("bias_add", "relu"), None, cout, sums=sums)
    rng = np.random.default_rng(21)
    x = stored(rng.standard_normal((n, h, w, cin)))
    weights = stored(rng.standard_normal((1, 1, cin, cout)))
    weights[..., :len(SPECIAL_BIASES)] = 0.0  # the special channels are their bias alone
    bias = (rng.standard_normal(cout) * 4).astype(np.float32)
    bias[:len(SPECIAL_BIASES)] = SPECIAL_BIASES.view(np.float32)
    alpha = 0.25  # a leaky ReLU: negative values are scaled, not zeroed
    out = bf16(np.zeros((n, h, w, cout)))
    fields = dict(cin=cin, kh=1, kw=1, stride=1, oh=h, ow=w, panels_outer=0,
                  **strides("x", x), **strides("out", out), **{"e1.alpha": alpha})
    pointers = {"x": bf16(x), "w": _packed(weights, kernel), "out": out, "e0.bias": bias}
    if sums:
        fields.update({"sums.chunk": 64, "sums.width": cout})
        pointers.update(sums=np.zeros(2 * cout), scratch=np.zeros(2 * cout, np.float32))
    call(kernel, fields, pointers, (0, n * h * w), (0, cout), cache_dir)
    got = out.astype(np.float32)
    flushes = "vcvtneps2bf16" in jit.assembly(kernel.ir(), kernel.target)
    # flushing, the arithmetic reads a denormal as a zero: the accumulator's, +0.0
    seen = np.where(np.abs(bias) < np.finfo(np.float32).tiny, np.float32(0), bias) \
        if flushes else bias
    with np.errstate(over="ignore", invalid="ignore"):
        exact = np.where(seen < 0, seen * np.float32(alpha), seen)
        expected = epilogue_reference(("bias_add", "relu"), 0, conv_reference(
            x, weights, 1, (0,) * 4), {"e0.bias": bias.astype(np.float64)}, {"e1.alpha": alpha})
    special = out[..., :len(SPECIAL_BIASES)]
    want = bf16(np.broadcast_to(exact[:len(SPECIAL_BIASES)], special.shape))
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(special.astype(np.float32)), nan)
    np.testing.assert_array_equal(special.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert close(got[..., len(SPECIAL_BIASES):], expected[..., len(SPECIAL_BIASES):]) < TOL
    tiny = np.float32(1e-38)
    assert tiny / np.float32(16) > 0  # the caller's MXCSR back: denormals not flushed


@pytest.mark.parametrize("channels", [1, 16])
def test_rounding_is_to_nearest_even_as_ml_dtypes_rounds(channels, cache_dir):
    """A float32 -> bfloat16 copy rounds every value as the reference backend's ml_dtypes
    does, bit for bit: ties to even both ways, carries into the exponent, the largest
    finite values, overflow to infinity, denormals, signed zeros, infinities and NaN. On
    AVX512-BF16 by vcvtneps2bf16, which flushes denormals: a vector holding one (each
    special value alone in a vector on 1 channel; all together on 16) takes the integer
    rounding, the others the instruction."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F808001, 0x3FFF8000, 0x7F7F7FFF,
                     0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x00018000, 0x00000001, 0x80000000,
                     0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xBF808000],
                    np.uint32)
    rng = np.random.default_rng(15)
    values = np.concatenate([bits.view(np.float32),
                             rng.standard_normal(46).astype(np.float32) * 1e3])
    x = values.reshape(1, 1, 64 // channels, channels)
    out = bf16(np.zeros(x.shape))
    kernel = EltwiseKernel("float32", HOST, storage=(("out", BF16),))
    if HOST.has("avx512_bf16"):
        assert "vcvtneps2bf16" in jit.assembly(kernel.ir(), HOST)
    call(kernel, dict(oh=1, ow=64 // channels, **strides("x", x),
                      **strides("out", out)),
         {"x": x, "out": out}, (0, 64 // channels), (0, channels), cache_dir)
    expected = bf16(x)
    nan = np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(out.astype(np.float32)), nan)
    np.testing.assert_array_equal(out.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])


def test_mean_and_its_gradient_cross_types(cache_dir):
    """The global mean reads bfloat16 and writes float32 (the pooled features); its gradient
    reads float32 and writes bfloat16."""
    rng = np.random.default_rng(9)
    x = bf16(rng.standard_normal((3, 5, 7, 19)))
    out = np.empty((3, 19), np.float32)
    call(MeanKernel("float32", HOST, storage=(("x", BF16),)),
         dict(h=5, w=7, **strides("x", x), **strides("out", out)), {"x": x, "out": out},
         (0, 3), (0, 19), cache_dir)
    assert close(out, x.astype(np.float64).mean(axis=(1, 2))) < F32_TOL
    dy = rng.standard_normal((3, 10)).astype(np.float32)
    grad = bf16(np.zeros((3, 4, 5, 10)))
    call(MeanGradKernel("float32", HOST, storage=(("out", BF16),)),
         dict(oh=4, ow=5, **strides("dy", dy), **strides("out", grad)),
         {"dy": dy, "out": grad}, (0, 60), (0, 10), cache_dir)
    (expected,) = ops.get("global_avg_pool_grad").run_reference({"in_hw": (4, 5)}, dy)
    assert close(grad.astype(np.float32), stored(expected)) < 1e-7


# (n, h, w, cin, cout, k, stride, pads, chunk): blocks starting inside a row (chunks of 23),
# blocks of WGRAD_BLOCK pixels across images (700), stride 2, 1 x 1, the 7 x 7 stem's 3 channels
BF16_WGRAD_CASES = [
    (2, 7, 6, 5, 20, 3, 1, (1, 1, 1, 1), 23),
    (3, 14, 14, 8, 16, 3, 1, (1, 1, 1, 1), 700),
    (3, 8, 8, 6, 10, 3, 2, (0, 1, 0, 1), 23),
    (2, 9, 9, 17, 33, 1, 1, (0, 0, 0, 0), 100),
    (1, 10, 11, 3, 8, 7, 2, (2, 3, 3, 3), 40),
]


# (name, target, dot): the weight gradients this host runs on bfloat16
WGRAD_VARIANTS = [(f"fma-{t.isa}", t, "fma") for t in _fma_targets()] \
    + ([("dpbf16", HOST, "dpbf16")] if HAS_BF16 else [])


@pytest.mark.parametrize("case", BF16_WGRAD_CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[3]}b{c[8]}")
@pytest.mark.parametrize("variant", WGRAD_VARIANTS, ids=lambda v: v[0])
def test_weight_gradient_reads_bf16_and_sums_in_float32(variant, case, cache_dir):
    """dW of bfloat16 x and dy, staged a block at a time (the input rows its windows cover,
    read from a buffer padded wider than the conv needs, and dy of the call's channels),
    widened for FMAs or in pairs of pixels for vdpbf16ps (runs of odd length among them),
    accumulated in float32 registers and float64 slots: the exact products of bfloat16
    values summed, so float32's bound holds (1e-5)."""
    _, target, dot = variant
    n, h, w, cin, cout, k, stride, pads, chunk = case
    rng = np.random.default_rng(16)
    wider = bf16(padded(rng.standard_normal((n, h, w, cin)), [p + 1 for p in pads]))
    xp = wider[:, 1:-1, 1:-1]  # the conv's window, inside the buffer
    oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    dy = bf16(rng.standard_normal((n, oh, ow, cout)))
    kernel = WgradKernel("float32", target, storage=(("dy", BF16), ("x", BF16)), dot=dot)
    assert kernel.staged and not kernel.widens and kernel.paired == (dot == "dpbf16")
    pixels, depth = n * oh * ow, k * k * cin
    slots = -(-pixels // chunk)
    partial = np.full(slots * depth * cout, np.nan)
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow, chunk=chunk, width=cout,
                  **strides("x", wider), **strides("dy", dy))
    fields.update(kernel.scratch_fields(fields))
    scratch = np.full(kernel.scratch_for(fields, cout) // 4, np.nan, np.float32)
    split = min(kernel.nr, cout)
    for start in range(0, pixels, chunk):
        for channels in ((0, split), (split, cout)):
            if channels[0] < channels[1]:
                call(kernel, fields, {"x": xp, "dy": dy, "partial": partial,
                                      "scratch": scratch},
                     (start, min(pixels, start + chunk)), channels, cache_dir)
    dw = partial.reshape(slots, -1).sum(axis=0).reshape(k, k, cin, cout)
    x64, dy64 = xp.astype(np.float64), dy.astype(np.float64)
    expected = np.zeros((k, k, cin, cout))
    for i in range(k):
        for j in range(k):
            taps = x64[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            expected[i, j] = np.einsum("nhwc,nhwo->co", taps, dy64)
    assert close(dw, expected) < F32_TOL


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("variant", WGRAD_VARIANTS, ids=lambda v: v[0])
def test_weight_gradient_prologue_against_the_bf16_reference(variant, stride, cache_dir):
    """A 1 x 1 weight gradient reading x through a batch norm and ReLU (`fuse_prologues`):
    20 input channels (a masked vector on every width), calls of 23 pixels (blocks of odd
    length, which pairs of pixels end with a pixel of zeros). Against float64 on the
    activation as a bfloat16 tensor stores it: the products of bfloat16 values are exact, so
    float32's bound holds (1e-5), but for an activation a float32 rounding moves across a
    bfloat16 tie (one unit of 2^-8 in a sum: 1e-2, as the conv's prologue)."""
    _, target, dot = variant
    prologue = ("batch_normalize", "relu")
    kernel = WgradKernel("float32", target, prologue=prologue, dot=dot,
                         storage=(("dy", BF16), ("x", BF16)))
    rng = np.random.default_rng(17)
    x = bf16(rng.standard_normal((2, 9, 9, 20)))
    oh = ow = (9 - 1) // stride + 1
    dy = bf16(rng.standard_normal((2, oh, ow, 12)))
    operands, scalars = _operands(rng, prologue, 0, x.shape, np.float32)
    activated = stored(epilogue_reference(prologue, 0, x.astype(np.float64), operands,
                                          scalars))[:, ::stride, ::stride]
    expected = np.einsum("nhwc,nhwo->co", activated, dy.astype(np.float64))
    pixels, chunk = 2 * oh * ow, 23
    slots = -(-pixels // chunk)
    partial = np.full(slots * 20 * 12, np.nan)
    fields = dict(cin=20, kh=1, kw=1, stride=stride, oh=oh, ow=ow, chunk=chunk, width=12,
                  **strides("x", x), **strides("dy", dy), **scalars)
    fields.update(kernel.scratch_fields(fields) if kernel.staged else {})
    scratch = np.full(kernel.scratch_for(fields, 12) // 4, np.nan, np.float32)
    for start in range(0, pixels, chunk):
        call(kernel, fields, {"x": x, "dy": dy, "partial": partial, "scratch": scratch,
                              **operands}, (start, min(pixels, start + chunk)), (0, 12),
             cache_dir)
    dw = partial.reshape(slots, -1).sum(axis=0).reshape(20, 12)
    assert close(dw, expected) < TOL


def test_a_weight_gradient_pairs_pixels_where_the_target_has_avx512_bf16():
    """Generated, not run (any host): a bfloat16 weight gradient on AVX512-BF16, staged from
    the slab or through a prologue, multiplies pairs of pixels by vdpbf16ps, each x pair
    broadcast (in a tile one vector wide, the instruction's memory operand), by no FMA;
    the kernel carries the feature, and refuses a target without it or operands stored
    otherwise."""
    target = generic_target("avx512+avx512_bf16")
    storage = (("dy", BF16), ("x", BF16))
    for prologue, nv in (((), 2), (("batch_normalize", "relu"), 2), ((), 1)):
        kernel = WgradKernel("float32", target, 8, nv, storage=storage, dot="dpbf16",
                             prologue=prologue)
        text = kernel.ir()
        assert "+avx512bf16" in function_features(text)
        assembly = jit.assembly(text, target)
        dots = re.findall(r"^\s*vdpbf16ps\s.*$", assembly, re.M)
        assert len(dots) >= kernel.mr * nv
        assert prologue or "vfmadd" not in assembly  # (a prologue's batch norm has its own)
        if nv == 1:
            assert all("{1to16}" in dot for dot in dots)
    with pytest.raises(ValueError, match="needs a target with avx512_bf16"):
        WgradKernel("float32", generic_target("avx512"), storage=storage, dot="dpbf16").ir()
    with pytest.raises(ValueError, match="needs bfloat16 x and dy"):
        WgradKernel("float32", target, storage=(("x", BF16),), dot="dpbf16").ir()


@pytest.mark.parametrize("geometry", [(32, 32, 1, 3), (8, 8, 1, 3), (7, 5, 2, 1), (112, 112, 2, 7),
                                      (3, 200, 1, 3), (1, 1, 1, 1)])
def test_a_staged_block_fits_the_slab_it_is_given(geometry):
    """`slab_rows` bounds the input rows the windows of every block of WGRAD_BLOCK pixels
    cover (from its first window row, through the images' rows between, to its last), for
    blocks starting at every pixel of as many images as two blocks cross, and is no more
    than one image boundary's rows above the most of them."""
    oh, ow, stride, kh = geometry
    fields = dict(oh=oh, ow=ow, stride=stride, kh=kh)
    height, total = (oh - 1) * stride + kh, (2 * WGRAD_BLOCK // (oh * ow) + 3) * oh * ow

    def row(pixel, last):  # a pixel's first window row, or one past its last
        n, i = divmod(pixel, oh * ow)
        return n * height + i // ow * stride + (kh if last else 0)
    covered = [row(min(start + WGRAD_BLOCK, total) - 1, True) - row(start, False)
               for start in range(total)]
    assert max(covered) <= slab_rows(fields) <= max(covered) + max(0, kh - stride)


@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_gradient_kernels(relu, cache_dir):
    """The sums and the apply of a batch-norm gradient on bfloat16 dy and x, per-channel
    vectors float32: sums at float32's bound, dx rounded once where it is stored."""
    rng = np.random.default_rng(11)
    x, dr = bf16(rng.standard_normal((2, 5, 6, 11))), bf16(rng.standard_normal((2, 5, 6, 11)))
    gamma = rng.uniform(0.5, 1.5, 11).astype(np.float32)
    beta = rng.normal(0, 0.3, 11).astype(np.float32)
    x32, dr32 = x.astype(np.float32), dr.astype(np.float32)
    mean, var = x32.mean(axis=(0, 1, 2)), x32.var(axis=(0, 1, 2))
    attrs = {"epsilon": 1e-3, "alpha": 0.1}
    name = "batch_norm_relu_grad" if relu else "batch_norm_grad"
    args = (dr32, x32, gamma, beta, mean, var) if relu else (dr32, x32, gamma, mean, var)
    dx_ref, dgamma_ref, dbeta_ref = ops.get(name).run_reference(
        attrs, *[a.astype(np.float64) for a in args])
    pointers = {"dy": dr, "x": x, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    fields = dict(oh=5, ow=6, epsilon=1e-3, alpha=0.1, chunk=16, width=11, images=2,
                  **strides("dy", dr), **strides("x", x))
    partial = np.full(4 * 2 * 11, np.nan)
    sums = ChannelSums("float32", HOST, f"{name}_sums", storage=(("dy", BF16), ("x", BF16)))
    for start in range(0, 60, 16):
        call(sums, fields, dict(pointers, partial=partial), (start, min(60, start + 16)),
             (0, 11), cache_dir)
    dbeta, dgamma = partial.reshape(4, 2, 11).sum(axis=0)
    assert close(dgamma, dgamma_ref) < F32_TOL and close(dbeta, dbeta_ref) < F32_TOL
    dx = bf16(np.zeros(x.shape))
    apply = BatchNormGradApply("float32", HOST, f"{name}_apply",
                               storage=(("dy", BF16), ("out", BF16), ("x", BF16)))
    call(apply, dict(fields, **strides("out", dx)),
         dict(pointers, dgamma=dgamma_ref.astype(np.float32),
              dbeta=dbeta_ref.astype(np.float32), out=dx), (0, 60), (0, 11), cache_dir)
    assert close(dx.astype(np.float32), stored(dx_ref)) < TOL


def function_features(text: str) -> set:
    """The target features of the one function in a kernel's IR."""
    (features,) = re.findall(r'"target-features"="([^"]*)"', text)
    return set(features.split(","))


def test_amx_kernel_is_generated_with_its_features_and_instructions():
    """The AMX conv for a target with AMX, on this host whatever it has: its function
    carries the AMX features (so code generation never aborts the process), and its
    assembly configures, loads, multiplies, stores and releases the tiles."""
    target = generic_target("avx512+amx_bf16+avx512_bf16")
    kernel = _conv_kernel(("amx", AmxConvKernel, target, "amx", {}), ("bias_add", "relu"),
                          ("affine",), 40)
    text = kernel.ir()
    assert {"+avx512f", "+avx512bw", "+amx-tile", "+amx-bf16"} <= function_features(text)
    assembly = jit.assembly(text, target)
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbf16ps", "tilestored",
                        "tilerelease"):
        assert instruction in assembly, instruction
    assert assembly.count("tdpbf16ps") % 4 == 0  # the 2 x 2 blocking: 4 a k step
    if not HOST.has("amx_bf16"):
        assert not target.runs_here()
        with pytest.raises(ValueError, match="cannot run"):
            jit.address(kernel)


def test_pair_kernel_needs_its_extension_and_bfloat16_operands():
    """vdpbf16ps only where the target has AVX512-BF16 and for bfloat16 inputs and weights;
    a kernel generated for it carries the feature, so it compiles on any code generator.
    A tile one vector wide takes each input pair as the instruction's broadcast memory
    operand."""
    target = generic_target("avx512+avx512_bf16")
    kernel = _conv_kernel(("dpbf16", ConvKernel, target, "dpbf16", {}), ("relu",), None, 32)
    assembly = jit.assembly(kernel.ir(), generic_target("avx512"))
    assert "vdpbf16ps" in assembly
    one_vector = _conv_kernel(("dpbf16", ConvKernel, target, "dpbf16", {}), ("relu",), None, 16)
    dots = re.findall(r"^\s*vdpbf16ps\s.*$", jit.assembly(one_vector.ir(), target), re.M)
    assert dots and all("{1to16}" in dot for dot in dots)  # the input pair broadcast by it
    with pytest.raises(ValueError, match="needs a target with avx512_bf16"):
        ConvKernel("float32", generic_target("avx512"), dot="dpbf16",
                   storage=(("w", BF16), ("x", BF16))).ir()
    with pytest.raises(ValueError, match="needs bfloat16 inputs and weights"):
        ConvKernel("float32", target, dot="dpbf16").ir()
