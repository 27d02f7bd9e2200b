"""Winograd F(2x2, 3x3) (`backends/cpu/winograd.py`, `llvm/winograd.py`): the matrices against
the definition of a convolution, the kernel against float64 NumPy (odd maps whose last tiles
overhang them, output channels that are not a multiple of the panel, every kind of epilogue
operand, a second output), a call's exact tile and channel range, and which layers lowering
gives it.

The vdpbf16ps variant (bfloat16 tensors) is held to what it computes, its transforms rounded
to bfloat16 (`test_pair_kernel_matches_its_roundings` gives its bounds).

Tolerances, relative to the expected tensor's max: float64 1e-12; float32 2e-6 for these
<= 288-term dot products of unit normals, whose direct float32 sum errs by about 1e-6. A
Winograd output carries the transforms' few extra roundings but sums 16 shorter dot products
(cin terms each, not 9 cin), and `test_float32_error_...` bounds its error by the direct
kernel's on the same data.
"""

import zlib

import numpy as np
import pytest

from pathlib import Path

import rescompile as rc
from rescompile.precision import numpy_dtype
from rescompile.backends.cpu import CpuProgram, winograd
from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.winograd import WinogradInputKernel, WinogradKernel
from rescompile.backends.cpu.llvm import jit
from rescompile.backends.cpu.target import ISAS, generic_target, host_target
from rescompile.backends.cpu.weights import pack_weights, transformed
from rescompile.compiler import lower
from rescompile.entries import make_entries
from microkernels import (call, close, conv_reference, epilogue_reference, padded, strides)
from test_cpu_microkernels import RUNNABLE, _operands

TOL = {"float32": 2e-6, "float64": 1e-12}
ULP = 2.0 ** -8  # bfloat16's, relative: a stored output rounded the other way
PRESETS = Path(rc.__file__).parent / "presets"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("objects")


def test_the_matrices_compute_a_3x3_correlation():
    """Y = A^T [(G g G^T) * (B^T d B)] A is the 2 x 2 valid correlation of a 4 x 4 window."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    bt, at = np.array(winograd.INPUT_TRANSFORM), np.array(winograd.OUTPUT_TRANSFORM)
    u = transformed(g.reshape(3, 3, 1, 1), "winograd")[:, :, 0, 0]
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    direct = [[(d[i:i + 3, j:j + 3] * g).sum() for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(y, direct, rtol=0, atol=1e-13)


def _layer(rng, n, h, w, cin, cout, dtype, steps, out2):
    """Inputs, weights, epilogue operands, and the float64 expected out and out2."""
    x = rng.standard_normal((n, h, w, cin)).astype(dtype)
    weights = rng.standard_normal((3, 3, cin, cout)).astype(dtype)
    y = conv_reference(x, weights, 1, (1, 1, 1, 1))
    operands, scalars = _operands(rng, steps, 0, y.shape, dtype)
    more, more_scalars = _operands(rng, out2 or (), len(steps), y.shape, dtype)
    operands.update(more)
    scalars.update(more_scalars)
    expected = epilogue_reference(steps, 0, y, operands, scalars)
    return x, weights, operands, scalars, expected, \
        epilogue_reference(out2 or (), len(steps), expected, operands, scalars)


def _run(kernel, x, weights, operands, scalars, tiles, channels, cache_dir):
    """The kernel on tiles [tiles) and channels [channels) of x: out and out2 (NaN where not
    written)."""
    n, h, w, cin = x.shape
    cout = weights.shape[-1]
    out = np.full((n, h, w, cout), np.nan, x.dtype)
    out2 = np.full_like(out, np.nan)
    xp = padded(x, winograd.window_pads((h, w)))
    fields = dict(cin=cin, oh=h, ow=w, tiles_h=winograd.tiles(h),
                  tiles_w=winograd.tiles(w),
                  **strides("x", xp), **strides("out", out), **strides("out2", out2), **scalars)
    for name, array in operands.items():
        if array.ndim == 4:
            fields.update(strides(name, array))
    scratch = np.full(kernel.scratch_bytes(cin) // x.dtype.itemsize, np.nan, x.dtype)
    packed = pack_weights(transformed(weights, "winograd"), kernel.nr)
    pointers = dict(x=xp, w=packed, out=out, out2=out2, scratch=scratch, **operands)
    call(kernel, fields, pointers, tiles, channels, cache_dir)
    return out, out2


CASES = [
    # (n, h, w, cin in vectors, cout, epilogue, out2)
    (2, 9, 11, 1, 40, ("bias_add", "relu"), None),
    (1, 8, 8, 2, 33, ("add",), ("affine", "relu")),
    (3, 10, 7, 1, 16, ("batch_normalize", "relu"), None),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}c{c[4]}")
def test_winograd_kernel_matches_numpy(case, dtype, cache_dir):
    n, h, w, vectors, cout, steps, out2 = case
    cin = vectors * host_target().lanes(dtype)
    kernel = WinogradKernel(dtype, host_target(), steps, out2)
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x, weights, operands, scalars, expected, expected2 = _layer(rng, n, h, w, cin, cout, dtype,
                                                                steps, out2)
    tiles = n * winograd.tiles(h) * winograd.tiles(w)
    out, second = _run(kernel, x, weights, operands, scalars, (0, tiles), (0, cout), cache_dir)
    assert close(out, expected) < TOL[dtype]
    if out2 is not None:
        assert close(second, expected2) < TOL[dtype]


@pytest.mark.parametrize("target", RUNNABLE, ids=lambda t: t.isa)
def test_every_runnable_instruction_set(target, cache_dir):
    """Each variant this CPU can run (the host's, and narrower ones) computes the same layer:
    an odd map, a residual add and a second output."""
    kernel = WinogradKernel("float32", target, ("add",), ("affine", "relu"))
    rng = np.random.default_rng(7)
    x, weights, operands, scalars, expected, expected2 = _layer(
        rng, 2, 9, 7, 2 * target.lanes("float32"), 21, "float32", ("add",), ("affine", "relu"))
    tiles = 2 * winograd.tiles(9) * winograd.tiles(7)
    out, out2 = _run(kernel, x, weights, operands, scalars, (0, tiles), (0, 21), cache_dir)
    assert close(out, expected) < TOL["float32"] and close(out2, expected2) < TOL["float32"]


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_compiles(isa):
    """Variants this CPU cannot run are still generated and compiled, with their registers."""
    target = generic_target(isa)
    assembly = jit.assembly(WinogradKernel("float32", target, ("bias_add", "relu")).ir(), target)
    register = {"avx512": "zmm", "avx2": "ymm", "portable": "xmm"}[isa]
    assert f"%{register}" in assembly
    assert ("vfmadd" in assembly) == (isa != "portable")


DOTS = ["fma"] + (["dpbf16"] if host_target().has("avx512_bf16") else [])


@pytest.mark.parametrize("dot", DOTS)
def test_a_staged_transform_gives_the_same_bits(dot, cache_dir):
    """The input transform as a step of its own (`WinogradInputKernel`, then a `staged`
    kernel reading its output) computes exactly what the kernel that transforms its own
    tiles does, over calls of a few tiles each; with vdpbf16ps (bfloat16 tensors), its
    tensor holds the transformed inputs rounded to bfloat16, as the scratch does."""
    lanes = host_target().lanes("float32")
    rng = np.random.default_rng(8)
    steps = ("bias_add", "add", "relu")
    x, weights, operands, scalars, expected, _ = _layer(rng, 2, 9, 10, 2 * lanes, 40,
                                                        "float32", steps, None)
    n, h, w, cin = x.shape
    th, tw = winograd.tiles(h), winograd.tiles(w)
    pairs = dot == "dpbf16"
    kind = numpy_dtype("bfloat16") if pairs else np.float32
    storage = (("out", "bfloat16"), ("w", "bfloat16"), ("x", "bfloat16")) if pairs else ()
    x = x.astype(kind)
    xp = padded(x.astype(np.float32), winograd.window_pads((h, w))).astype(kind)
    kernels = {staged: WinogradKernel("float32", host_target(), steps, staged=staged, dot=dot,
                                      storage=storage) for staged in (False, True)}
    packed = pack_weights(transformed(_bf16(weights).astype(np.float32) if pairs else weights,
                                      "winograd"), kernels[False].nr,
                          dtype="bfloat16" if pairs else None, layout="vnni2" if pairs else "")
    outputs = {}
    for staged, kernel in kernels.items():
        source = xp
        if staged:
            source = np.full((n, winograd.POINTS, th * tw, cin), np.nan,
                             np.float32).astype(kind)
            transform = WinogradInputKernel("float32", host_target(), storage=(
                (("out", "bfloat16"), ("x", "bfloat16")) if pairs else ()))
            fields = dict(cin=cin, tiles_h=th, tiles_w=tw, **strides("x", xp),
                          **strides("out", source))
            for first in range(0, n * th * tw, 7):
                call(transform, fields, dict(x=xp, out=source),
                     (first, min(first + 7, n * th * tw)), (0, cin), cache_dir)
        out = np.full(expected.shape, np.nan, np.float32).astype(kind)
        fields = dict(cin=cin, oh=h, ow=w, tiles_h=th, tiles_w=tw, **strides("x",
                      source),
                      **strides("out", out), **strides("e1.other", out), **scalars)
        scratch = np.full(kernel.scratch_bytes(cin) // 4, np.nan, np.float32)
        pointers = dict(x=source, w=packed, out=out, scratch=scratch, **operands)
        call(kernel, fields, pointers, (0, n * th * tw), (0, 40), cache_dir)
        outputs[staged] = out.astype(np.float32)
    assert np.array_equal(outputs[True], outputs[False])
    assert close(outputs[True], expected) < (2e-2 if pairs else TOL["float32"])


def test_the_pair_kernel_is_generated_on_any_host():
    """The vdpbf16ps variant for an AVX512-BF16 target, whatever this host has: its products
    on vdpbf16ps, its transformed inputs converted by vcvtneps2bf16."""
    target = generic_target("avx512+avx512_bf16")
    kernel = WinogradKernel("float32", target, ("bias_add", "relu"), dot="dpbf16",
                            storage=(("out", "bfloat16"), ("w", "bfloat16"), ("x", "bfloat16")))
    assembly = jit.assembly(kernel.ir(), target)
    assert "vdpbf16ps" in assembly and "vcvtneps2bf16" in assembly


def test_a_call_covers_exactly_its_tiles_and_channels(cache_dir):
    """Tiles starting mid-row and spanning images, channels from a panel to mid-panel: those
    pixels get the same bits as a whole call gives them, and nothing else is written."""
    kernel = WinogradKernel("float32", host_target(), ("bias_add",))
    lanes = host_target().lanes("float32")
    rng = np.random.default_rng(5)
    x, weights, operands, scalars, _, _ = _layer(rng, 3, 7, 9, lanes, 3 * lanes, "float32",
                                                 ("bias_add",), None)
    th, tw = winograd.tiles(7), winograd.tiles(9)
    whole, _ = _run(kernel, x, weights, operands, scalars, (0, 3 * th * tw), (0, 3 * lanes),
                    cache_dir)
    t0, t1, c0, c1 = 5, 2 * th * tw + 3, kernel.nr, 3 * lanes - 3
    part, _ = _run(kernel, x, weights, operands, scalars, (t0, t1), (c0, c1), cache_dir)
    tile = np.arange(3 * th * tw).reshape(3, th, tw)
    covered = np.repeat(np.repeat(tile, 2, axis=1), 2, axis=2)[:, :7, :9]
    inside = np.zeros(part.shape, bool)
    inside[..., c0:c1] = ((covered >= t0) & (covered < t1))[..., None]
    assert np.array_equal(part[inside], whole[inside])
    assert np.isnan(part[~inside]).all()


def test_float32_error_stays_within_a_small_factor_of_the_direct_kernels(cache_dir):
    """On a 64-channel layer, Winograd's float32 error against float64 is no larger than the
    direct kernel's (measured on four seeds: 0.26-0.42 of it, the shorter sums outweighing
    the transforms' roundings)."""
    lanes = host_target().lanes("float32")
    cin = 64 // lanes * lanes
    rng = np.random.default_rng(6)
    x, weights, operands, scalars, expected, _ = _layer(rng, 2, 12, 12, cin, 64, "float32",
                                                        ("bias_add",), None)
    tiles = 2 * 6 * 6
    fast, _ = _run(WinogradKernel("float32", host_target(), ("bias_add",)), x, weights,
                   operands, scalars, (0, tiles), (0, 64), cache_dir)
    direct = ConvKernel("float32", host_target(), ("bias_add",))
    out = np.full(expected.shape, np.nan, np.float32)
    xp = padded(x, (1, 1, 1, 1))
    fields = dict(cin=cin, kh=3, kw=3, stride=1, oh=12, ow=12, panels_outer=0,
                  **strides("x", xp), **strides("out", out))
    call(direct, fields, dict(x=xp, w=pack_weights(weights, direct.nr), out=out, **operands),
         (0, 2 * 144), (0, 64), cache_dir)
    error = np.abs(fast - expected).max()
    assert error <= np.abs(out - expected).max()


def _bf16(array) -> np.ndarray:
    return np.asarray(array, np.float32).astype(numpy_dtype("bfloat16"))


@pytest.mark.skipif(not host_target().has("avx512_bf16"), reason="host has no AVX512-BF16")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}c{c[4]}")
def test_pair_kernel_matches_its_roundings(case, cache_dir):
    """The vdpbf16ps variant on bfloat16 inputs and weights, against float64 NumPy of what it
    computes: B^T d B and G g G^T each rounded to bfloat16, their products summed, A^T M A,
    the epilogue, and the output rounded to bfloat16 as stored (within ULP: a float32 sum
    near a rounding boundary may round the other way, an epilogue scaling by up to 2 doubles
    it for out2; measured 0 to 1.4e-6); and within 2e-2 of the exact convolution of its
    bfloat16 operands (measured 4.5e-3 to 5.7e-3, more than ULP: the transforms' roundings
    show)."""
    n, h, w, vectors, cout, steps, out2 = case
    target = host_target()
    cin = vectors * target.lanes("float32")
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()) + 1)
    x = _bf16(rng.standard_normal((n, h, w, cin)))
    weights = _bf16(rng.standard_normal((3, 3, cin, cout))).astype(np.float32)
    operands, scalars = _operands(rng, steps, 0, (n, h, w, cout), "float32")
    more, more_scalars = _operands(rng, out2 or (), len(steps), (n, h, w, cout), "float32")
    operands.update(more)
    scalars.update(more_scalars)
    kernel = WinogradKernel("float32", target, steps, out2, dot="dpbf16",
                            storage=(("out", "bfloat16"), ("out2", "bfloat16"),
                                     ("w", "bfloat16"), ("x", "bfloat16")))
    xp = padded(x.astype(np.float32), winograd.window_pads((h, w))).astype(x.dtype)
    out, second = _bf16(np.full((n, h, w, cout), np.nan)), _bf16(np.full((n, h, w, cout),
                                                                       np.nan))
    fields = dict(cin=cin, oh=h, ow=w, tiles_h=winograd.tiles(h),
                  tiles_w=winograd.tiles(w),
                  **strides("x", xp), **strides("out", out), **strides("out2", second),
                  **scalars)
    for name, array in operands.items():
        if array.ndim == 4:
            fields.update(strides(name, array))
    scratch = np.full(kernel.scratch_bytes(cin) // 4, np.nan, np.float32)
    packed = pack_weights(transformed(weights, "winograd"), kernel.nr, dtype="bfloat16",
                          layout="vnni2")
    tiles = n * winograd.tiles(h) * winograd.tiles(w)
    call(kernel, fields, dict(x=xp, w=packed, out=out, out2=second, scratch=scratch,
                              **operands), (0, tiles), (0, cout), cache_dir)
    y = _rounded_winograd(x.astype(np.float64), weights.astype(np.float64))
    exact = conv_reference(x.astype(np.float64), weights.astype(np.float64), 1, (1, 1, 1, 1))
    for conv, tol in ((y, ULP), (exact, 2e-2)):
        expected = epilogue_reference(steps, 0, conv, operands, scalars)
        stored = _bf16(expected).astype(np.float64)
        assert close(out.astype(np.float32), stored) < tol
        if out2 is not None:
            expected2 = epilogue_reference(out2, len(steps), stored, operands, scalars)
            assert close(second.astype(np.float32), expected2) < 2 * tol


SPECIAL_BIASES = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7F800000, 0xFF800000],
                          np.uint32)


@pytest.mark.parametrize("target", RUNNABLE, ids=lambda t: t.isa)
def test_fma_kernel_on_bfloat16_tensors(target, cache_dir):
    """bfloat16 input and output, float32 FMAs on float32 transforms (a bfloat16 model's
    kernel on AVX2 and AVX-512): against float64 on the bfloat16 input, rounded to bfloat16
    where it stores (2 ULP: a float32 sum near a rounding boundary rounds the other way, and
    the float32 transforms' error is some of it). Its first channels output their bias alone,
    special values: a NaN that the unguarded integer rounding would carry into the sign or
    into infinity stays NaN (the call is made again exactly, `Function.checks_by_call`), an
    infinity stays infinite."""
    steps = ("bias_add", "relu")
    rng = np.random.default_rng(8)
    n, h, w, cin, cout = 2, 9, 7, 2 * target.lanes("float32"), 21
    x = _bf16(rng.standard_normal((n, h, w, cin))).astype(np.float64)
    weights = _bf16(rng.standard_normal((3, 3, cin, cout))).astype(np.float64)
    weights[..., :len(SPECIAL_BIASES)] = 0.0
    operands, scalars = _operands(rng, steps, 0, (n, h, w, cout), "float32")
    operands["e0.bias"][:len(SPECIAL_BIASES)] = SPECIAL_BIASES.view(np.float32)
    kernel = WinogradKernel("float32", target, steps, None,
                            storage=(("out", "bfloat16"), ("x", "bfloat16")))
    tiles = n * winograd.tiles(h) * winograd.tiles(w)
    out, _ = _run(kernel, _bf16(x), weights.astype(np.float32), operands, scalars,
                  (0, tiles), (0, cout), cache_dir)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = epilogue_reference(steps, 0, conv_reference(x, weights, 1, (1, 1, 1, 1)),
                                      operands, scalars)
    want = _bf16(expected)
    special = slice(0, len(SPECIAL_BIASES))
    nan = np.isnan(want[..., special].astype(np.float32))
    np.testing.assert_array_equal(np.isnan(out[..., special].astype(np.float32)), nan)
    np.testing.assert_array_equal(out[..., special].view(np.uint16)[~nan],
                                  want[..., special].view(np.uint16)[~nan])
    rest = slice(len(SPECIAL_BIASES), None)
    assert close(out[..., rest].astype(np.float32),
                 want[..., rest].astype(np.float64)) < 2 * ULP


def _rounded_winograd(x, w):
    """F(2x2, 3x3) in float64 with the transformed inputs and weights rounded to bfloat16."""
    n, h, wd, cin = x.shape
    th, tw = winograd.tiles(h), winograd.tiles(wd)
    xp = padded(x, winograd.window_pads((h, wd)))
    bt, at = np.array(winograd.INPUT_TRANSFORM), np.array(winograd.OUTPUT_TRANSFORM)
    u = _bf16(transformed(w.astype(np.float32), "winograd")).astype(np.float64)
    y = np.zeros((n, 2 * th, 2 * tw, w.shape[-1]))
    for i in range(th):
        for j in range(tw):
            d = xp[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4, :]
            v = _bf16(np.einsum("ab,nbcq,dc->nadq", bt, d, bt)).astype(np.float64)
            m = np.einsum("nabq,abqk->nabk", v, u)
            y[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = np.einsum("ia,nabk,jb->nijk", at, m, at)
    return y[:, :h, :wd]


def test_lowering_gives_winograd_the_stride_1_3x3_layers_of_inference():
    """In an inference schedule, every stride-1 3 x 3 convolution on a map of at least
    MIN_MAP a side, of whole vectors of input channels, runs as Winograd tiles (all but the
    stem's 3-channel one and the strided ones), and nothing else does."""
    graph = lower(PRESETS / "seed_basic_small.toml", "infer", "float32").graph
    program = CpuProgram(graph, make_entries(graph, "infer"), "float32", tune=False,
                         generate_only=True)
    lowered = {s.name: type(s.kernel) for s in program.schedule.kernel_steps}
    expected = {}
    for node in graph.nodes:
        if node.op == "fused_conv2d":
            k = graph.value(node.inputs[1]).shape[0]
            h = graph.value(node.outputs[0]).shape[1]
            cin = graph.value(node.inputs[0]).shape[-1]
            takes = (k == 3 and node.attrs["stride"] == 1 and h >= winograd.MIN_MAP
                     and cin % program.target.lanes("float32") == 0)
            expected[node.name] = WinogradKernel if takes else ConvKernel
    assert {n: lowered[n] for n in expected} == expected
    assert set(expected.values()) == {WinogradKernel, ConvKernel}


@pytest.mark.parametrize("dot", DOTS)
def test_a_bfloat16_model_takes_winograd_on_fmas_and_on_vdpbf16ps(dot):
    """On the host's plain vector ISA (bfloat16 storage, float32 FMAs) and, where it has
    them, on AVX512-BF16's vdpbf16ps, a bfloat16 model's stride-1 3x3 layers run as Winograd
    tiles, reading and storing bfloat16, and its logits stay within the bfloat16 tolerance
    of the bfloat16 reference (2e-2, `test_bf16.py`; measured 3e-3 on FMAs, as the direct
    kernels' own, and 4.4e-3 on vdpbf16ps)."""
    spec = rc.load_spec(PRESETS / "seed_basic_small.toml")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, *spec.model.input)).astype(np.float32)
    host = host_target()
    exe = rc.compile(spec, mode="infer", backend="cpu", dtype="bfloat16",
                     isa=host.name if dot == "dpbf16" else host.isa)
    kernels = [s.kernel for s in exe.program.schedule.kernel_steps
               if isinstance(s.kernel, WinogradKernel)]
    assert kernels and all(k.element("x") == "bfloat16" and k.dot == dot for k in kernels)
    reference = rc.compile(spec, mode="infer", backend="reference", dtype="bfloat16")
    assert close(exe.forward(x), reference.forward(x).astype(np.float64)) < 2e-2


def test_the_pair_kernel_needs_bfloat16_operands_and_its_extension():
    """vdpbf16ps Winograd tiles refuse float32 operands and a target without AVX512-BF16, in
    one line, before generating anything."""
    storage = (("out", "bfloat16"), ("w", "bfloat16"), ("x", "bfloat16"))
    with pytest.raises(ValueError, match="needs bfloat16 inputs and weights"):
        WinogradKernel("float32", generic_target("avx512+avx512_bf16"), dot="dpbf16").ir()
    with pytest.raises(ValueError, match="needs a target with avx512_bf16"):
        WinogradKernel("float32", generic_target("avx512"), dot="dpbf16", storage=storage).ir()
