"""The CPU inference program: whole models against the reference backend (depth-first, shared
and mixed batches, both dtypes, v1 and v2 units, the ImageNet stem, unoptimised graphs), results
that do not depend on how the batch is split, and the structure of ResNet-164's schedule (its
kernels, steps and compiled functions), so a lost fusion or a new per-layer kernel fails here.

Tolerance against the reference (float64 NumPy ops, or float32 for float32 models), relative to
the logits' max: 1e-5 in float32 (a handful of float32 layers, each within about 1e-6),
1e-12 in float64.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rescompile as rc
from rescompile.backends.cpu import driver
from rescompile.backends.cpu.arena import CHUNKS_PER_THREAD
from conftest import random_bn_state, rel_err, tiny_spec
from strategies import small_specs

TOL = {"float32": 1e-5, "float64": 1e-12}
MODELS = {
    "v2-conv1stride-same": dict(),
    "v1-conv2stride-symmetric": dict(preactivation=False, stride_on="conv2",
                                     padding="symmetric", relu_leakiness=0.0),
    "imagenet-stem": dict(stem="imagenet", input=[20, 18, 3]),
}


def _pair(spec, dtype, seed=0, **options):
    reference = rc.compile(spec, mode="infer", dtype=dtype, seed=seed, **options)
    state = random_bn_state(reference, seed)
    reference.load_params(state)
    exe = rc.compile(spec, mode="infer", dtype=dtype, backend="cpu", **options)
    exe.load_params(state)
    return exe, reference


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", list(MODELS))
def test_model_matches_reference_at_every_split(model, dtype):
    """Batch 1 runs shared, 4 depth first, 5 both; every image's logits are the same bits
    whichever way it ran."""
    exe, reference = _pair(tiny_spec(unit="bottleneck", **MODELS[model]), dtype)
    x = np.random.default_rng(0).standard_normal((5, *exe.spec.model.input))
    logits = exe.forward(x)
    assert rel_err(logits, reference.forward(x)) < TOL[dtype]
    np.testing.assert_array_equal(exe.forward(x[:4]), logits[:4])
    np.testing.assert_array_equal(exe.forward(x[4:]), logits[4:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=small_specs(), dtype=st.sampled_from(["float32", "float64"]),
       batch=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_random_specs_match_reference(spec, dtype, batch, seed):
    """Any stem, unit, padding, stride and odd image size, at any batch (depth first, shared
    or both)."""
    exe, reference = _pair(spec, dtype, seed)
    x = np.random.default_rng(seed).standard_normal((batch, *spec.model.input))
    assert rel_err(exe.forward(x), reference.forward(x)) < TOL[dtype]


def test_unoptimised_graph_runs_every_core_op():
    """optimize=False leaves conv, batch_norm, relu and add nodes: each has a kernel."""
    exe, reference = _pair(tiny_spec(), "float64", optimize=False)
    assert {s.op for s in exe.program.schedule.steps} >= {"conv2d", "batch_norm", "relu", "add"}
    x = np.random.default_rng(1).standard_normal((3, 8, 8, 3))
    assert rel_err(exe.forward(x), reference.forward(x)) < TOL["float64"]


def test_small_images_run_several_per_call():
    """Layers with few pixels per image start a segment taking several images per call."""
    exe, reference = _pair(tiny_spec(), "float32")
    segments = exe.program.schedule.segments
    assert [s.images for s in segments] == [1, 4]
    boundary = exe.program.schedule.steps[segments[1].begin].inputs[0]
    assert "later segment" in exe.program.schedule.batch_values[boundary]
    x = np.random.default_rng(2).standard_normal((7, 8, 8, 3))
    assert rel_err(exe.forward(x), reference.forward(x)) < TOL["float32"]


@pytest.fixture(scope="module")
def resnet164():
    return rc.compile(rc.preset("cifar-resnet164"), mode="infer", backend="cpu")


def test_resnet164_schedule_structure(resnet164):
    """163 fused convs and 3 projections, one pad copy of the images, the pool and the dense
    head: 169 kernel calls per image, from 7 distinct micro-kernels."""
    schedule = resnet164.program.schedule
    ops = [s.op for s in schedule.steps]
    assert len(ops) == 169
    assert (ops.count("fused_conv2d"), ops.count("conv2d"), ops.count("copy")) == (163, 3, 1)
    assert ops[-2:] == ["global_avg_pool", "dense"]
    kernels = {(type(k).__name__, getattr(k, "epilogue", getattr(k, "steps", ())),
                getattr(k, "out2", None)) for k in resnet164.program.kernels}
    assert kernels == {("ConvKernel", ("bias_add", "relu"), None),  # conv1, conv2, stem
                       ("ConvKernel", ("add",), ("affine", "relu")),  # conv3 + next BN-ReLU
                       ("ConvKernel", ("add", "affine", "relu"), None),  # last conv3 + final BN
                       ("ConvKernel", (), None),  # projections
                       ("ConvKernel", ("bias_add",), None),  # the dense head
                       ("EltwiseKernel", (), None),  # the images into a padded buffer
                       ("MeanKernel", (), None)}
    assert len(resnet164.program.kernels) == 7
    assert [s.images for s in schedule.segments] == [1]


def test_resnet164_compiles_one_driver_function(resnet164):
    x = np.zeros((2, 32, 32, 3), np.float32)
    resnet164.forward(x)
    resnet164.forward(x[:1])
    compiled = {f.py_func.__name__: len(f.signatures) for f in driver.compiled_functions()}
    # the helpers are inlined into the one parallel function
    assert compiled == {"_chunk": 0, "_resolve": 0, "_run_step": 0, "_wait": 0, "_pieces": 0,
                        "_piece": 0, "run_program": 1}


def test_profile_counts_every_kernel_call(resnet164):
    program = resnet164.program
    program.start_profile()
    resnet164.forward(np.zeros((3, 32, 32, 3), np.float32))
    calls = program.profile[:, :, driver.CALLS].sum(axis=0)
    rows = program.profile_rows(3)
    program.profile = None
    assert {r["name"] for r in rows} == {s.name for s in program.schedule.steps}
    assert all(r["ms"] >= 0 and r["wait_ms"] >= 0 for r in rows)
    steps = len(program.schedule.steps)
    depth_first, shared = calls[:steps], calls[steps:]
    assert depth_first.tolist() == [2] * steps  # two images, one per call
    # the third image runs shared: each step in chunks, at least two per thread (fewer only
    # where a step has fewer units of work: the dense head's 10 channels are one panel)
    low, high = CHUNKS_PER_THREAD
    threads = driver.threads()
    assert all(1 <= c <= high * threads for c in shared)
    stage1 = [i for i, s in enumerate(program.schedule.steps) if s.pixels == 1024]
    assert all(low * threads <= shared[i] <= high * threads for i in stage1)
    assert shared[-1] == 1
