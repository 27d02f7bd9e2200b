"""The CPU inference program: whole models against the reference backend (depth-first, shared
and mixed batches, both dtypes, v1 and v2 units, the ImageNet stem, unoptimised graphs), results
that do not depend on how the batch is split, and the structure of ResNet-164's schedule (its
kernels, steps and compiled functions), so a lost fusion or a new per-layer kernel fails here.

Tolerance against the reference (float64 NumPy ops, or float32 for float32 models), relative to
the logits' max: 1e-5 in float32 (a handful of float32 layers, each within about 1e-6),
1e-12 in float64.
"""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rescompile as rc
from rescompile.backends.cpu import driver, tuning
from rescompile.backends.cpu.arena import CHUNKS_PER_THREAD
from rescompile.backends.cpu.tuning import PIXEL_SPLIT_MIN
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
    """166 convs (53 of them conv1s reading the residual stream through the unit's BN-ReLU as
    they load it, `fuse_prologues`; 3 projections), one pad copy of the images, the pool and
    the dense head: 169 kernel calls per image (and on 8-lane vectors 18 staged input
    transforms), from 11 distinct micro-kernels (12 where stage 3's Winograd tiles take fewer
    rows), the 3x3 layers' Winograd tiles among them."""
    schedule = resnet164.program.schedule
    ops = [s.op for s in schedule.steps]
    lanes = resnet164.program.target.lanes("float32")
    assert ops.count("winograd_input") == (18 if lanes <= 8 else 0)
    assert len(ops) == 169 + ops.count("winograd_input")
    assert (ops.count("fused_conv2d"), ops.count("prologue_fused_conv2d"), ops.count("conv2d"),
            ops.count("copy")) == (110, 53, 3, 1)
    assert ops[-2:] == ["global_avg_pool", "dense"]
    # the first stage's 16-channel layers take a tile one vector wide where a vector holds 16,
    # the dense head's 10 classes where it holds 10; a 3x3 layer of 4 or more panels (64
    # channels in 8-lane vectors) transforms its input in a kernel of its own
    one, head = (1 if lanes >= 16 else 2,), (1 if lanes >= 10 else 2,)
    kernels = {(type(k).__name__, getattr(k, "epilogue", ()), getattr(k, "out2", None),
                getattr(k, "prologue", None))
               + tuple(getattr(k, field) for field in ("nv", "staged") if hasattr(k, field))
               for k in resnet164.program.kernels}
    staged = {("WinogradInputKernel", (), None, None),
              ("WinogradKernel", ("bias_add", "relu"), None, (), 2, True)} if lanes <= 8 \
        else set()
    bn_relu = ("affine", "relu")
    assert kernels == {("ConvKernel", ("bias_add", "relu"), None, bn_relu, 2),  # conv1
                       ("ConvKernel", ("bias_add", "relu"), None, bn_relu) + one,  # stage 1's
                       ("ConvKernel", ("bias_add", "relu"), None, ()) + one,  # stem, unit_1_0
                       ("WinogradKernel", ("bias_add", "relu"), None, (), 2, False),  # conv2
                       ("WinogradKernel", ("bias_add", "relu"), None, ()) + one + (False,),
                       ("ConvKernel", ("add",), None, (), 2),  # conv3
                       ("ConvKernel", ("add", "affine", "relu"), None, (), 2),  # last + BN
                       ("ConvKernel", (), None, (), 2),  # projections
                       ("ConvKernel", ("bias_add",), None, ()) + head,  # the dense head
                       ("EltwiseKernel", (), None, None),  # the images into a padded buffer
                       ("MeanKernel", (), None, None)} | staged
    # stage 3's 8 x 8 maps make 16 Winograd tiles an image: where the widest rows would leave
    # a quarter of their tiles empty (14 rows: 12 of 28), the rows that divide 16 instead, in
    # a kernel of their own
    target = resnet164.program.target
    fitted = tuning.tile_rows(target, 2, pixels=16)
    assert {s.kernel.mr for s in schedule.steps if s.name.startswith("unit_3_")
            and s.name.endswith("conv2")} == {fitted}
    assert len(resnet164.program.kernels) == len(kernels) + (fitted != tuning.tile_rows(target, 2))
    assert [s.images for s in schedule.segments] == [1]


def test_resnet164_compiles_one_driver_function(resnet164):
    x = np.zeros((2, 32, 32, 3), np.float32)
    resnet164.forward(x)
    resnet164.forward(x[:1])
    compiled = {f.py_func.__name__: len(f.signatures) for f in driver.compiled_functions()}
    # the helpers are inlined into the pool thread's loop, the caller's part of a run and the
    # caller's run alone
    assert compiled == {"_chunk": 0, "_resolve": 0, "_run_step": 0, "_wait": 0, "_pieces": 0,
                        "_piece": 0, "_thread": 0, "_start": 0, "_part": 0, "_array": 0,
                        "_array2": 0, "_array3": 0, "serve": 1, "lead": 1, "run_alone": 1}


def test_profile_counts_every_kernel_call(resnet164):
    program = resnet164.program
    program.start_profile()
    start = time.perf_counter()
    resnet164.forward(np.zeros((3, 32, 32, 3), np.float32))
    wall_ms = 1e3 * (time.perf_counter() - start)
    calls = program.profile[:, :, driver.CALLS].sum(axis=0)
    rows = program.profile_rows(3)
    program.profile = None
    assert {r["name"] for r in rows} == {s.name for s in program.schedule.steps}
    # a thread's share of the kernels' time fits in the call's wall time, and every conv ran
    assert 0 < sum(r["ms"] + r["wait_ms"] for r in rows) <= wall_ms
    assert all(r["gflops"] > 0 for r in rows if r["kernel"].startswith("conv_"))
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
    # every layer of more than a few pixels keeps every thread busy, whatever its split: a
    # 3 x 3 layer whose channels are one panel (stages 2 and 3) is cut by pixels instead
    layers = [i for i, s in enumerate(program.schedule.steps) if s.pixels >= PIXEL_SPLIT_MIN]
    assert len(layers) > 150 and all(shared[i] >= threads for i in layers)
    assert shared[-1] == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_profile_counts_the_bytes_a_conv_step_moves(dtype):
    """The train step's projection 1x1 conv, 4 -> 8 channels on 8 x 8 images, batch 2:
    it reads its input, the four per-channel vectors of the BN-ReLU it applies as it reads
    (float32, `fuse_prologues`) and one panel of packed weights, and writes its output, each
    in the bytes of the type it is stored in (a bfloat16 model's activations 2 an element, its
    packed weights 2 for the pair kernels, 4 for FMAs, which hold them as float32)."""
    exe = rc.compile(tiny_spec(), mode="train", backend="cpu", dtype=dtype)
    program = exe.program
    program.start_profile()
    exe.train_step(np.ones((2, 8, 8, 3), np.float32), np.array([0, 1]))
    rows = {r["name"]: r for r in program.profile_rows(2)}
    program.profile = None
    row = rows["unit_1_0/sub_add/project"]
    weights = next(s for s in program.plan("train_step").schedule.steps
                   if s.name == row["name"]).uses["w"]
    pixel = 2 if dtype == "bfloat16" else 4
    packed = {"bfloat16": 2, "float32": 4}[program.types.packed(weights)]
    assert row["bytes_read"] == pixel * 2 * 8 * 8 * 4 + 4 * 4 * 4 + packed * 1 * 1 * 4 * weights.nr
    assert row["bytes_written"] == pixel * 2 * 8 * 8 * 8
    assert row["flop_per_byte"] == 2 * (2 * 8 * 8) * 4 * 8 / (row["bytes_read"] +
                                                                row["bytes_written"])
    assert rows["unit_1_0/sub2/bn2"]["flop_per_byte"] is None  # a pass without FLOPs


# --- training ---------------------------------------------------------------------------------
# Tolerances against the reference, relative to each tensor's max: float64 1e-10; float32 1e-4
# (a gradient passes through three convolutions and batch norms per unit, each summing
# thousands of float32 products in another order than NumPy's; observed up to 2e-5).
TRAIN_TOL = {"float32": 1e-4, "float64": 1e-10}


def _train_pair(spec, dtype, seed=0):
    reference = rc.compile(spec, mode="train", dtype=dtype, seed=seed)
    state = random_bn_state(reference, seed)
    reference.load_params(state)
    exe = rc.compile(spec, mode="train", dtype=dtype, backend="cpu", seed=seed)
    exe.load_params(state)
    return exe, reference


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", list(MODELS))
def test_training_entries_match_reference(model, dtype):
    exe, reference = _train_pair(tiny_spec(unit="bottleneck", **MODELS[model]), dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, *exe.spec.model.input))
    labels = rng.integers(0, 5, 5)
    loss, grads = exe.loss_and_grads(x, labels)
    ref_loss, ref_grads = reference.loss_and_grads(x, labels)
    assert abs(loss - ref_loss) <= TRAIN_TOL[dtype] * abs(ref_loss)
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) < TRAIN_TOL[dtype], name
    dlogits = rng.standard_normal((5, 5))
    assert rel_err(exe.forward(x), reference.forward(x)) < TRAIN_TOL[dtype]
    ref_backward = reference.backward(dlogits)
    for name, grad in exe.backward(dlogits).items():
        assert rel_err(grad, ref_backward[name]) < TRAIN_TOL[dtype], name
    exe.train_step(x, labels)
    reference.train_step(x, labels)
    for name, value in reference.state.items():
        assert rel_err(exe.state[name], value) < TRAIN_TOL[dtype], name


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=small_specs(), batch=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_random_specs_train_like_the_reference(spec, batch, seed):
    """Any stem, unit, padding, stride and odd image size (float64: batch statistics of a few
    pixels make float32 gradients ill-conditioned, which is rounding, not the kernels)."""
    dtype = "float64"
    exe, reference = _train_pair(spec, dtype, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.model.input))
    labels = rng.integers(0, spec.model.num_classes, batch)
    exe.train_step(x, labels)
    reference.train_step(x, labels)
    # A gradient that is zero in exact arithmetic (the beta of a batch norm over one image and
    # a few pixels, whose output only another batch norm reads) is rounding noise, eps times
    # the sum of its terms' sizes: 1e-22 to 5e-16 here, 1e-18 there. Compared on the scale
    # of 1e-4 (the slots of this model are 1e-3 to 1), such noise stays under 1e-11.
    for name, value in reference.state.items():
        assert rel_err(exe.state[name], value, floor=1e-4) < TRAIN_TOL[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_does_not_depend_on_the_thread_count(dtype):
    """Every reduction is cut into fixed chunks combined in order: a step on 1 thread and on
    2 gives the same bits (so a run resumed on another machine continues bit for bit), in
    bfloat16 as in float32."""
    import numba
    spec = tiny_spec(unit="bottleneck", input=[12, 12, 3])
    rng = np.random.default_rng(2)
    x, labels = rng.standard_normal((9, 12, 12, 3)), rng.integers(0, 5, 9)
    results = []
    before = numba.get_num_threads()
    for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
        numba.set_num_threads(threads)
        try:
            exe = rc.compile(spec, mode="train", backend="cpu", seed=3, dtype=dtype)
            loss, grads = exe.loss_and_grads(x, labels)
            exe.train_step(x, labels)
            results.append((loss, grads, exe.state))
        finally:
            numba.set_num_threads(before)
    (loss1, grads1, state1), (loss2, grads2, state2) = results
    assert loss1 == loss2
    for name in grads1:
        np.testing.assert_array_equal(grads1[name], grads2[name], err_msg=name)
    for name in state1:
        np.testing.assert_array_equal(state1[name], state2[name], err_msg=name)


def test_check_finite_names_the_first_bad_training_kernel():
    exe = rc.compile(tiny_spec(), mode="train", backend="cpu", check_finite=True)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 3))
    exe.train_step(x, [0, 1])
    params = dict(exe.params)   # finite, but the first convolution overflows float32
    params["init/init_conv/DW"] = np.full(params["init/init_conv/DW"].shape, 3e38)
    exe.load_params(params)
    with pytest.raises(FloatingPointError, match="node 'init/init_conv'"):
        exe.train_step(x, [0, 1])


@pytest.fixture(scope="module")
def resnet164_train():
    return rc.compile(rc.preset("cifar-resnet164"), mode="train", backend="cpu")


def test_resnet164_train_step_structure(resnet164_train):
    """The train step's kernel calls and the micro-kernels they use: a lost fusion or a new
    per-layer kernel changes these numbers."""
    from rescompile.backends.cpu.steps import HostStep, Step
    program = resnet164_train.program
    steps = program.plan("train_step").schedule.steps
    kernels = [s for s in steps if isinstance(s, Step)]
    ops = [s.op for s in kernels]
    assert len(kernels) == 1216
    # per conv: forward (+ its statistics' sum), data gradient, weight gradient (+ its sum);
    # per batch norm: normalise, the gradient's sums' combination and its apply; the 1 x 1
    # convs reading a BN-ReLU (conv1, conv3, the first projection) normalise as they read,
    # forward and weight gradient
    assert (ops.count("fused_conv2d"), ops.count("prologue_fused_conv2d"),
            ops.count("fused_conv2d_grad_input"), ops.count("conv2d_grad_input"),
            ops.count("conv2d_grad_filter"), ops.count("prologue_conv2d_grad_filter")) == \
        (55, 109, 164, 1, 57, 109)
    assert (ops.count("fused_elementwise"), ops.count("batch_norm_relu_grad_apply"),
            ops.count("fused_batch_norm_relu_grad_apply")) == (55, 112, 51)
    # only the last batch norm, whose input gradient comes from the pool, sums on its own
    assert ops.count("batch_norm_relu_grad_sums") == 1
    assert "add" not in ops  # every gradient add runs in the kernel making its operand
    hosts = {s.op for s in steps if isinstance(s, HostStep)}
    assert hosts == {"softmax_cross_entropy", "softmax_cross_entropy_grad", "l2_penalty",
                     "l2_penalty_grad", "matmul", "sum_rows", "add", "momentum_update",
                     "moving_average"}
    # the first stage's 16-channel layers have kernels of their own where a vector holds 16,
    # and weight gradients tiles whose rows divide their depth
    assert len(program.kernels) == {"avx512": 29}.get(program.target.isa, 22)
    phases = sum(1 for a, b in zip([None] + steps, steps)
                 if isinstance(b, Step) and not isinstance(a, Step))
    assert phases == 2  # the forward and backward bodies: two calls of the driver
