"""The training program's kernels (the CPU backend's BLAS wrapper and generated conv kernels)
against NumPy float64 references, and a whole tiny model's train step against the reference
backend.

Kernels go to the user's kernel cache (content-hashed, so sharing it is safe and reruns are
fast); the cache itself is tested apart in a fresh directory."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rescompile.backends.cpu import blas
from rescompile.backends.cpu.conv_codegen import ConvSig, conv_kernel, conv_kernel_source, kernel_arg_names
from rescompile.backends.cpu.kernel_cache import compile_source
from rescompile.fileio import cache_root

RTOL = {"float32": 1e-5, "float64": 1e-12}


# --- float64 references: padded patches (im2col) and einsum ------------------------------

def _patches(x, k, s, pads):
    top, bottom, left, right = pads
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh = (xp.shape[1] - k) // s + 1
    ow = (xp.shape[2] - k) // s + 1
    taps = [xp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
            for i in range(k) for j in range(k)]
    return np.stack(taps, axis=3), xp.shape  # [N, OH, OW, k*k, cin]


def ref_conv(x, w, s, pads):
    k, _, cin, cout = w.shape
    p, _ = _patches(x, k, s, pads)
    return np.einsum("nhwpc,pco->nhwo", p, w.reshape(k * k, cin, cout))


def ref_grad_filter(x, dy, k, s, pads):
    p, _ = _patches(x, k, s, pads)
    return np.einsum("nhwpc,nhwo->pco", p, dy).reshape(k, k, x.shape[3], dy.shape[3])


def ref_grad_input(dy, w, x_shape, s, pads):
    k, _, cin, cout = w.shape
    top, bottom, left, right = pads
    n, h, wd, _ = x_shape
    dp = np.einsum("nhwo,pco->nhwpc", dy, w.reshape(k * k, cin, cout))
    dxp = np.zeros((n, h + top + bottom, wd + left + right, cin))
    oh, ow = dy.shape[1:3]
    for t in range(k * k):
        i, j = divmod(t, k)
        dxp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :] += dp[:, :, :, t, :]
    return dxp[:, top:top + h, left:left + wd, :]


def ref_epilogue(v, sig, params):
    for i, step in enumerate(sig.epilogue):
        if step[0] == "bias":
            v = v + params[f"bias_{i}"]
        elif step[0] == "affine":
            v = v * params[f"scale_{i}"] + params[f"shift_{i}"]
        elif step[0] == "relu":
            v = np.where(v >= 0, v, step[1] * v)
        elif step[0] == "add":
            v = v + params[f"res_{i}"]
    v2 = None
    if sig.has_out2:
        v2 = v * params["scale2"] + params["shift2"]
        v2 = np.where(v2 >= 0, v2, sig.alpha2 * v2)
    return v, v2


def assert_close(got, ref, dtype):
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs max|ref| {scale:.3g}"


@pytest.fixture(scope="module")
def cache_dir():
    return cache_root()


# --- BLAS ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    for trial in range(12):
        m, n, k = rng.integers(1, 40, size=3)
        ta, tb = bool(trial & 1), bool(trial & 2)
        pad_a, pad_b, pad_c = rng.integers(0, 5, size=3)
        a_rows, a_cols = (k, m) if ta else (m, k)
        b_rows, b_cols = (n, k) if tb else (k, n)
        # Operands live inside bigger buffers: leading dimensions and offsets.
        A = rng.standard_normal((a_rows + 2, a_cols + pad_a)).astype(dtype)
        B = rng.standard_normal((b_rows + 1, b_cols + pad_b)).astype(dtype)
        C = rng.standard_normal((m + 3, n + pad_c)).astype(dtype)
        a, b = A[2:, :a_cols], B[1:, :b_cols]
        beta = 1.0 if trial % 3 else 0.0
        ref = 0.75 * (a.T if ta else a).astype(np.float64) @ (b.T if tb else b) \
            + beta * C[3:, :n]
        for call in (blas.gemm, blas.gemm_njit):
            got = C.copy()
            call(ta, tb, m, n, k, 0.75, A.ravel()[2 * A.shape[1]:], A.shape[1],
                 B.ravel()[B.shape[1]:], B.shape[1], beta, got.ravel()[3 * C.shape[1]:],
                 C.shape[1])
            assert_close(got[3:, :n], ref, np.dtype(dtype).name)
            np.testing.assert_array_equal(got[:3], C[:3])  # rows before the offset untouched
            np.testing.assert_array_equal(got[3:, n:], C[3:, n:])  # columns past n untouched


def test_blas_threads_limits_every_copy():
    before = blas.get_blas_threads()
    with blas.blas_threads(1):
        assert set(blas.get_blas_threads().values()) == {1}
    assert blas.get_blas_threads() == before


# --- forward kernels ----------------------------------------------------------------

FORWARD_CASES = [
    # (n, h, w, cin, cout, k, s, pads, dtype, epilogue, has_out2, alpha2, extra)
    (2, 6, 5, 8, 12, 1, 1, (0, 0, 0, 0), "float32", (("bias",), ("relu", 0.0)), False, 0.0,
     dict(chunk_rows=25)),
    (2, 8, 8, 6, 10, 1, 2, (0, 0, 0, 0), "float64", (("relu", 0.1), ("affine",), ("bias",)),
     False, 0.0, dict(parallel=False)),
    (2, 7, 5, 6, 8, 3, 1, (1, 1, 1, 1), "float32", (("add",),), True, 0.0,
     dict(strategy="shifted", chunk_rows=3)),
    (3, 8, 8, 5, 7, 3, 2, (0, 1, 0, 1), "float64",
     (("bias",), ("affine",), ("relu", 0.2), ("add",)), True, 0.1, dict(parallel=False)),
    (2, 10, 11, 3, 8, 7, 2, (2, 3, 3, 3), "float32", (), False, 0.0, dict(parallel=False)),
    # Small images stacked 24 per GEMM (shifted, multi-image); groups=2: 25 + 25 -> 24 + 1.
    (50, 4, 5, 4, 6, 3, 1, (1, 1, 1, 1), "float32", (("bias",),), False, 0.0,
     dict(strategy="shifted", groups=2)),
    (2, 6, 7, 16, 16, 3, 1, (1, 1, 1, 1), "float32", (("affine",), ("relu", 0.0)), True, 0.0,
     dict(strategy="im2col", parallel=False)),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: f"k{c[5]}s{c[6]}{c[8]}")
def test_forward_kernel(case, cache_dir):
    n, h, w, cin, cout, k, s, pads, dtype, chain, has_out2, alpha2, extra = case
    sig = ConvSig("forward", h, w, cin, cout, k, s, pads, dtype, chain, has_out2, alpha2, **extra)
    rng = np.random.default_rng(hash(case[:8]) % 2**32)
    x = rng.standard_normal((n, h, w, cin))
    wt = rng.standard_normal((k, k, cin, cout))
    shape = (n, sig.oh, sig.ow, cout)
    params = {}
    for name in kernel_arg_names(sig)[2:]:
        if name.startswith("res_"):
            params[name] = rng.standard_normal(shape)
        elif not name.startswith("out"):
            params[name] = rng.standard_normal(cout)
    ref, ref2 = ref_epilogue(ref_conv(x, wt, s, pads), sig, params)
    kernel = conv_kernel(sig, cache_dir)
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    out, out2 = np.full(shape, np.nan, dtype), np.full(shape, np.nan, dtype)
    args = [cast(x), cast(wt)] + [cast(params[a]) for a in kernel_arg_names(sig)[2:]
                                  if a in params] + [out] + ([out2] if has_out2 else [])
    with blas.blas_threads(1 if sig.parallel else 2):
        kernel(*args)
    assert_close(out, ref, dtype)
    if has_out2:
        assert_close(out2, ref2, dtype)
    # float32 kernels must not be typed with float64 arrays anywhere.
    assert all(str(t.dtype) == dtype for t in kernel.signatures[0] if hasattr(t, "dtype"))


def test_float32_kernel_has_no_float64_arithmetic(tmp_path):
    """A fresh cache directory: Numba cannot inspect the LLVM of code loaded from its cache."""
    f = np.float32
    sig = ConvSig("forward", 6, 6, 4, 4, 3, 1, (1, 1, 1, 1), "float32",
                  (("affine",), ("relu", 0.1)), True, 0.2, parallel=False)
    conv = conv_kernel(sig, tmp_path)
    conv(np.ones((1, 6, 6, 4), f), np.ones((3, 3, 4, 4), f), np.ones(4, f), np.ones(4, f),
         np.ones(4, f), np.ones(4, f), np.empty((1, 6, 6, 4), f), np.empty((1, 6, 6, 4), f))
    llvm = conv.inspect_llvm(conv.signatures[0])
    assert "fmul double" not in llvm and "fadd double" not in llvm and "fpext" not in llvm


# --- backward kernels ---------------------------------------------------------------

BACKWARD_CASES = [
    # (n, h, w, cin, cout, k, s, pads, dtype, parallel, strategy);
    # parallel kernels compile ~2.5x slower, so only a few are parallel.
    (2, 5, 6, 8, 6, 1, 1, (0, 0, 0, 0), "float32", False, "auto"),
    (2, 7, 6, 5, 4, 3, 1, (1, 1, 1, 1), "float64", True, "shifted"),
    (2, 6, 6, 4, 6, 3, 1, (1, 1, 1, 1), "float32", False, "im2col"),
    (2, 8, 8, 4, 6, 3, 2, (0, 1, 0, 1), "float32", False, "auto"),
    (2, 8, 7, 4, 5, 1, 2, (0, 0, 0, 0), "float64", False, "auto"),
    (1, 10, 9, 3, 4, 7, 2, (2, 3, 3, 3), "float32", False, "auto"),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: f"k{c[5]}s{c[6]}{c[8]}{c[10]}")
def test_backward_kernels(case, cache_dir):
    n, h, w, cin, cout, k, s, pads, dtype, parallel, strategy = case
    rng = np.random.default_rng(sum(case[:7]))
    sig_dx, sig_dw = (ConvSig(op, h, w, cin, cout, k, s, pads, dtype, parallel=parallel,
                              strategy=strategy) for op in ("grad_input", "grad_filter"))
    x = rng.standard_normal((n, h, w, cin))
    wt = rng.standard_normal((k, k, cin, cout))
    dy = rng.standard_normal((n, sig_dx.oh, sig_dx.ow, cout))
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    dx = np.full(x.shape, np.nan, dtype)
    dw = np.full(wt.shape, np.nan, dtype)
    with blas.blas_threads(1):
        conv_kernel(sig_dx, cache_dir)(cast(dy), cast(wt), dx)
        conv_kernel(sig_dw, cache_dir)(cast(x), cast(dy), dw)
    assert_close(dx, ref_grad_input(dy, wt, x.shape, s, pads), dtype)
    assert_close(dw, ref_grad_filter(x, dy, k, s, pads), dtype)


# --- signatures, source and cache ------------------------------------------------------

def test_sig_validation_and_names():
    sig = ConvSig("forward", 8, 8, 4, 4, 3, 2, (0, 1, 0, 1), epilogue=[["relu", 0]])
    assert sig.epilogue == (("relu", 0.0),) and (sig.oh, sig.ow) == (4, 4)
    name, source = conv_kernel_source(sig)
    assert name.startswith("conv_fwd_") and f"def {name}(" in source
    assert conv_kernel_source(sig) == conv_kernel_source(ConvSig(**sig.__dict__))
    for bad in [dict(k=0), dict(stride=True), dict(pads=(1, 1)), dict(dtype="float16"),
                dict(epilogue=(("relu", float("nan")),)), dict(epilogue=(("gelu",),)),
                dict(strategy="shifted"), dict(strategy="direct")]:
        with pytest.raises(ValueError):
            ConvSig(**{**sig.__dict__, **bad})


def test_auto_strategy_on_resnet164_shapes():
    def pick(hw, c, k, s, pads):
        return ConvSig("forward", hw, hw, c, c, k, s, pads).resolved_strategy
    assert pick(32, 64, 1, 1, (0, 0, 0, 0)) == "direct"
    assert pick(32, 16, 3, 1, (1, 1, 1, 1)) == "shifted"
    assert pick(16, 32, 3, 1, (1, 1, 1, 1)) == "shifted"
    assert pick(8, 64, 3, 1, (1, 1, 1, 1)) == "im2col"
    assert pick(32, 16, 3, 2, (0, 1, 0, 1)) == "im2col"
    assert pick(32, 64, 1, 2, (0, 0, 0, 0)) == "im2col"


def test_second_process_loads_from_cache(tmp_path):
    sig = ConvSig("forward", 4, 4, 2, 2, 1, 1, dtype="float64", parallel=False,
                  epilogue=(("bias",),))
    script = textwrap.dedent(f"""
        import numpy as np
        from rescompile.backends.cpu.conv_codegen import ConvSig, conv_kernel
        k = conv_kernel(ConvSig(**{sig.__dict__!r}), {str(tmp_path)!r})
        out = np.empty((1, 4, 4, 2))
        k(np.ones((1, 4, 4, 2)), np.ones((1, 1, 2, 2)), np.ones(2), out)
        assert (out == 3).all()
        print(len(k.stats.cache_hits), len(k.stats.cache_misses))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, check=True).stdout.split() for _ in range(2)]
    assert runs[0] == ["0", "1"] and runs[1] == ["1", "0"]
    assert len(list(tmp_path.glob("rk_*.py"))) == 1


def test_compile_source_uses_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESCOMPILE_CACHE_DIR", str(tmp_path))
    fn = compile_source("f", "import numba\n\n@numba.njit(cache=True)\ndef f(a):\n    return a + 1\n")
    assert fn(1) == 2 and len(list(tmp_path.glob("rk_*.py"))) == 1


# --- the training program's kernels in a whole tiny model ----------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_train_step_matches_reference(dtype):
    import rescompile as rc
    from conftest import random_bn_state, rel_err, tiny_spec
    spec = tiny_spec(unit="bottleneck")
    ref = rc.compile(spec, mode="train", dtype=dtype)
    exe = rc.compile(spec, mode="train", dtype=dtype, backend="cpu")
    # The backward pass reads every conv output, so no unit groups; the momentum updates of
    # all parameters are one group (one kernel).
    assert list(exe.program.groups) == ["update/momentum[25]"]
    state = random_bn_state(ref)
    ref.load_params(state)
    exe.load_params(state)
    rng = np.random.default_rng(1)
    x, labels = rng.standard_normal((4, *spec.model.input)), rng.integers(0, 5, 4)
    assert abs(exe.train_step(x, labels) - ref.train_step(x, labels)) < 1e-5
    for name, value in ref.state.items():
        assert rel_err(exe.state[name], value) < RTOL[dtype] * 100, name
