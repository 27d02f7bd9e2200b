"""Stores past the caches: a training step whose tensors outgrow the threads' L2s stores its
outputs (convs, batch norms and their gradients) with non-temporal stores (`tuning.streams`,
`Arena.streams`). They change where the bytes go, never which bytes: every kernel variant
stores the same bits streaming or not, on rows that sit on the vector's size (the instruction's
need) and rows that do not (stored through the caches); the train step is bit-identical with
every step streaming and with none; inference never streams.
"""

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu import arena as arena_module
from rescompile.backends.cpu.arena import ALIGN, aligned_empty
from rescompile.backends.cpu.llvm import jit
from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.pixelwise import EltwiseKernel
from rescompile.backends.cpu.llvm.reduce import BatchNormGradApply
from rescompile.backends.cpu.target import ISAS, cache_bytes, generic_target, host_target
from rescompile.backends.cpu.tuning import streams
from rescompile.backends.cpu.weights import pack_weights
from rescompile.precision import numpy_dtype
from conftest import random_bn_state, tiny_spec
from microkernels import call, strides
from test_bf16_kernels import VARIANTS, _conv_kernel, _packed, bf16, stored

F32_TARGETS = [host_target()] + [generic_target(isa) for isa in ISAS
                                 if isa != host_target().isa and generic_target(isa).runs_here()]
SHAPE = (2, 3, 5, 6, 48)  # n, h, w, cin, cout: 48 channels, rows on 64 bytes in both types


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("streaming-objects")


def _aligned(shape, dtype, shift: int) -> np.ndarray:
    """A NaN-filled array starting `shift` elements past a cache line."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = aligned_empty((count + shift) * dtype.itemsize + ALIGN).view(dtype)
    raw[:] = np.array(np.nan, np.float32).astype(dtype)
    return raw[shift:shift + count].reshape(shape)


def _stored(kernel, fields, pointers, shape, dtype, streaming: int, shift: int, cache_dir):
    """The bits `kernel` stores into an output of `shape` starting `shift` elements past a
    cache line, with its `streaming` field set as given."""
    n, h, w, c = shape
    out = _aligned(shape, dtype, shift)
    call(kernel, dict(fields, streaming=streaming, **strides("out", out)),
         dict(pointers, out=out), (0, n * h * w), (0, c), cache_dir)
    return out.view(np.uint16 if out.dtype.itemsize == 2 else np.uint32).copy()


def _same_bits_streaming(kernel, fields, pointers, shape, dtype, cache_dir):
    for shift in (0, 1):  # rows on the vector's size, and rows off it
        cached = _stored(kernel, fields, pointers, shape, dtype, 0, shift, cache_dir)
        streamed = _stored(kernel, fields, pointers, shape, dtype, 1, shift, cache_dir)
        np.testing.assert_array_equal(streamed, cached)
    assembly = jit.assembly(kernel.ir(), kernel.target)
    # (LLVM stores vcvtneps2bf16's results through the caches: `Function.stream_store`)
    assert "movnt" in assembly or "vcvtneps2bf16" in assembly


def _conv_bits(kernel, x, weights, residual, dtype, cache_dir):
    n, h, w, cin, cout = SHAPE
    fields = dict(cin=cin, kh=1, kw=1, stride=1, oh=h, ow=w, panels_outer=0,
                  **strides("x", x), **strides("e0.other", residual), **{"e1.alpha": 0.0})
    pointers = {"x": x, "w": weights, "e0.other": residual}
    _same_bits_streaming(kernel, fields, pointers, (n, h, w, cout), dtype, cache_dir)


@pytest.mark.parametrize("target", F32_TARGETS, ids=lambda t: t.isa)
def test_float32_conv_streams_the_same_bits(target, cache_dir):
    n, h, w, cin, cout = SHAPE
    rng = np.random.default_rng(5)
    kernel = ConvKernel("float32", target, ("add", "relu"))
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    residual = rng.standard_normal((n, h, w, cout)).astype(np.float32)
    weights = pack_weights(rng.standard_normal((1, 1, cin, cout)).astype(np.float32),
                           kernel.nr)
    _conv_bits(kernel, x, weights, residual, np.float32, cache_dir)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_bfloat16_conv_streams_the_same_bits(variant, cache_dir):
    n, h, w, cin, cout = SHAPE
    rng = np.random.default_rng(6)
    kernel = _conv_kernel(variant, ("add", "relu"), None, cout)
    x = bf16(stored(rng.standard_normal((n, h, w, cin))))
    residual = bf16(rng.standard_normal((n, h, w, cout)))
    weights = _packed(stored(rng.standard_normal((1, 1, cin, cout))), kernel)
    _conv_bits(kernel, x, weights, residual, numpy_dtype("bfloat16"), cache_dir)


@pytest.mark.parametrize("target", F32_TARGETS, ids=lambda t: t.isa)
def test_pixel_kernels_stream_the_same_bits(target, cache_dir):
    """The training steps' pixel-wise kernels that write a tensor: a batch norm and ReLU,
    and a batch norm's gradient with the residual stream's other gradient added."""
    n, h, w, _, c = SHAPE
    rng = np.random.default_rng(8)
    x, dy, other = (rng.standard_normal((n, h, w, c)).astype(np.float32) for _ in range(3))
    channel = {name: rng.uniform(0.5, 1.5, c).astype(np.float32)
               for name in ("gamma", "beta", "mean", "var", "dgamma", "dbeta")}
    normalize = EltwiseKernel("float32", target, ("batch_normalize", "relu"))
    fields = dict(oh=h, ow=w, **strides("x", x), **{"e0.epsilon": 1e-3, "e1.alpha": 0.0})
    pointers = dict(x=x, **{f"e0.{name}": channel[name]
                            for name in ("gamma", "beta", "mean", "var")})
    _same_bits_streaming(normalize, fields, pointers, (n, h, w, c), np.float32, cache_dir)
    apply = BatchNormGradApply("float32", target, "batch_norm_relu_grad_apply", ("add",))
    fields = dict(oh=h, ow=w, images=n, epsilon=1e-3, alpha=0.0, **strides("dy", dy),
                  **strides("x", x), **strides("e0.other", other))
    pointers = dict(dy=dy, x=x, **channel, **{"e0.other": other})
    _same_bits_streaming(apply, fields, pointers, (n, h, w, c), np.float32, cache_dir)


def _run(mode: str, dtype: str, rule, monkeypatch):
    """A fresh executable of the tiny spec run once in `mode` under `rule` (for
    `tuning.streams`): the kernels of the steps its arena streams, and what the run made
    (train: the loss and every parameter after the step; infer: the logits)."""
    monkeypatch.setattr(arena_module, "streams", rule)
    marked = []
    decide = arena_module.Arena.streams

    def record(self, step):
        streams = decide(self, step)
        if streams:
            marked.append(step.kernel)
        return streams
    monkeypatch.setattr(arena_module.Arena, "streams", record)
    exe = rc.compile(tiny_spec(), mode=mode, backend="cpu", dtype=dtype, seed=4, tune=False)
    exe.load_params(random_bn_state(exe, seed=5))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    if mode == "infer":
        made = {"logits": exe.forward(x)}
    else:
        made = {"loss": np.float64(exe.train_step(x, rng.integers(0, 5, 6)))}
        made.update(exe.params)
    monkeypatch.undo()
    return marked, made


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_same_bits_with_every_step_streaming(dtype, monkeypatch):
    streamed, made = _run("train", dtype, lambda *_: True, monkeypatch)
    cached, reference = _run("train", dtype, lambda *_: False, monkeypatch)
    assert not cached
    assert {type(kernel) for kernel in streamed} == {ConvKernel, EltwiseKernel,
                                                      BatchNormGradApply}
    assert made.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(made[name], value, err_msg=name)


def test_inference_never_streams(monkeypatch):
    marked, _ = _run("infer", "float32", lambda *_: True, monkeypatch)
    assert marked == []


def test_streaming_past_the_threads_l2s():
    """The rule: a step streams when its pixels outgrow the L2s of the threads running it."""
    l2 = cache_bytes(2)
    assert streams(2 * l2 + 1, 2) and not streams(2 * l2, 2) and streams(l2 + 1, 1)
