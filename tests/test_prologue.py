"""fuse_prologues: a batch norm and ReLU read only by 1 x 1 convolutions and their weight
gradients runs in those kernels (on the input as they read it) and is never written; in
inference the same chain leaves the conv that made it as a second output. What it fuses and
refuses, that it changes no number (the reference in float64; the cpu backend's train step and
forward bit for bit, on every instruction set the host runs, in float32 and bfloat16), and that
the arena no longer holds the activations it replaced."""

from pathlib import Path

import numpy as np
import pytest

import rescompile

from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.wgrad import WgradKernel
from rescompile.backends.cpu.target import generic_target
from rescompile.check import evaluate, random_feeds, relative_change
from rescompile.compiler import lower
from rescompile.passes import PIPELINES
from rescompile.runtime import Executable
from conftest import random_bn_state, tiny_spec

# Pre-activation bottlenecks whose channel counts are no multiple of any vector (6 and 10
# inner channels, 24 and 40 outer: the prologue's masked tails), the second stage strided in
# its 1 x 1 conv1 and its projection (strided readers of the activation).
SPEC = tiny_spec(unit="bottleneck", preactivation=True, stride_on="conv1", stem_filters=4,
                 stages=[{"filters": 24, "units": 2, "stride": 1},
                         {"filters": 40, "units": 1, "stride": 2}],
                 activate_before_residual=[True, False])
# each mode's pipeline without the pass
WITHOUT = {mode: [p for p in passes if p.name != "fuse_prologues"]
           for mode, passes in PIPELINES.items()}


def readers(graph, op):
    return sorted(n.name for n in graph.nodes if n.op == op)


def test_the_activations_of_one_by_one_convs_fuse_into_them_and_the_rest_are_refused():
    lowered = lower(SPEC, "train", "float64")
    graph = lowered.graph
    convs = readers(graph, "prologue_fused_conv2d")
    # every unit's conv1 (its BN-ReLU on the residual stream; strided in unit_2_0) and conv3
    # (bn3), and the first stage's projection, which reads its unit's activation (the
    # second's reads the stream itself: activate_before_residual is false there)
    assert convs == sorted([f"{u}/sub{i}/conv{i}" for u in ("unit_1_0", "unit_1_1", "unit_2_0")
                            for i in (1, 3)] + ["unit_1_0/sub_add/project"])
    assert readers(graph, "prologue_conv2d_grad_filter") == \
        sorted(f"grad/{name}/dw" for name in convs)
    # bn2 feeds a 3 x 3 conv, whose zero border the chain would move, and the final batch
    # norm the global pool: they stay kernels, each said why
    kept = [n for n in graph.nodes if n.op == "fused_elementwise"]
    assert sorted(n.name for n in kept) == [f"{u}/sub2/bn2" for u in (
        "unit_1_0", "unit_1_1", "unit_2_0")] + ["unit_last/final_bn"]
    remarks = {r.node: r.reason for r in lowered.remarks if r.pass_name == "fuse_prologues"}
    assert remarks["unit_1_0/sub2/bn2"] == ("not fused into its readers: unit_1_0/sub2/conv2 "
                                            "reads it through a window wider than 1 x 1, or "
                                            "padded")
    assert remarks["unit_last/final_bn"].startswith("not fused into its readers: ")
    assert "takes no prologue" in remarks["unit_last/final_bn"]
    # the activation the kernels now make as they read is no value of the graph
    assert "unit_1_1/residual_bn_relu/relu" not in graph.values


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_the_fusion_changes_no_number_in_the_reference(mode):
    fused = lower(SPEC, mode, "float64")
    plain = lower(SPEC, mode, "float64", pipeline=WITHOUT[mode])
    feeds = random_feeds(fused, batch=3)
    a, b = evaluate(fused.graph, feeds), evaluate(plain.graph, feeds)
    for key, value in fused.graph.outputs.items():
        assert relative_change(b[plain.graph.outputs[key]], a[value]) == 0, key


def instruction_sets():
    """The host's own kernels (vdpbf16ps for bfloat16 where it has AVX512-BF16) and every
    vector width it runs (float32 FMAs, or none: the portable set)."""
    return [None] + [isa for isa in ("avx512", "avx2", "portable")
                     if generic_target(isa).runs_here()]


def executable(dtype, isa, pipeline=None, mode="train"):
    lowered = lower(SPEC, mode, dtype, pipeline=pipeline, backend="cpu")
    exe = Executable(lowered, backend="cpu", seed=2, tune=False, isa=isa)
    exe.load_state(random_bn_state(exe, seed=4))
    return exe


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", instruction_sets())
def test_a_train_step_is_the_same_bits_with_and_without_the_fusion(dtype, isa):
    """Two train steps (the second on updated weights and statistics) and the forward after
    them: the prologue's activation is the elementwise kernel's, bit for bit; the arena's
    tensors take less (the activations lived from the forward pass to the weight
    gradients)."""
    rng = np.random.default_rng(5)
    images, labels = rng.standard_normal((6, 8, 8, 3)), rng.integers(0, 5, 6)
    results = []
    for pipeline in (None, WITHOUT["train"]):
        exe = executable(dtype, isa, pipeline)
        schedule = exe.program.plan("train_step").schedule
        kernels = [s.kernel for s in schedule.kernel_steps]
        staged = [k for k in kernels if isinstance(k, (ConvKernel, WgradKernel))
                  and k.prologue]
        losses = [exe.train_step(images, labels) for _ in range(2)]
        results.append((losses, exe.state, exe.forward(images), len(staged),
                        exe.program.arena(schedule, 6).shared_region.nbytes))
    (loss_a, state_a, logits_a, staged_a, bytes_a), \
        (loss_b, state_b, logits_b, staged_b, bytes_b) = results
    assert (staged_a, staged_b) == (14, 0)
    assert loss_a == loss_b
    np.testing.assert_array_equal(logits_a, logits_b)
    for name, value in state_a.items():
        np.testing.assert_array_equal(value, state_b[name], err_msg=name)
    assert bytes_a < bytes_b


def test_an_inference_activation_leaves_its_conv_for_the_one_by_one_convs_reading_it():
    """The next unit's BN-ReLU, a conv3's second output without the pass, is applied by the
    conv1 reading the stream; a second output read through a padded 3 x 3 window stays, said
    why."""
    graph = lower(SPEC, "infer", "float64").graph
    assert readers(graph, "prologue_fused_conv2d") == ["unit_1_1/sub1/conv1",
                                                        "unit_2_0/sub1/conv1"]
    assert not any(n.attrs.get("out2") for n in graph.nodes)
    assert "unit_1_1/residual_bn_relu/relu" not in graph.values
    conv3 = next(n for n in graph.nodes if n.name == "unit_1_0/sub3/conv3")
    assert (conv3.outputs, conv3.attrs["epilogue"]) == (("unit_1_0/sub_add/add",),
                                                        [{"op": "add", "args": [2]}])
    assert len(conv3.inputs) == 3  # the chain's operands went with it
    preset = Path(rescompile.__file__).parent / "presets" / "seed_basic_small.toml"
    basic = lower(preset, "infer", "float64")
    kept = [n.name for n in basic.graph.nodes if n.attrs.get("out2")]
    remarks = {r.node: r.reason for r in basic.remarks if r.pass_name == "fuse_prologues"}
    assert kept and set(kept) == set(remarks)
    assert all("window wider than 1 x 1, or padded" in why for why in remarks.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", instruction_sets())
def test_inference_is_the_same_bits_with_and_without_the_fusion(dtype, isa):
    """The conv1s' staged rows are the activation the conv3s stored (rounded to bfloat16,
    then held in float32 where FMAs multiply them), bit for bit, on odd channel counts; the
    forward's arena holds one tensor fewer a unit."""
    rng = np.random.default_rng(7)
    images = rng.standard_normal((5, 8, 8, 3))
    results = []
    for pipeline in (None, WITHOUT["infer"]):
        exe = executable(dtype, isa, pipeline, mode="infer")
        schedule = exe.program.plan("forward").schedule
        staged = [s.kernel for s in schedule.kernel_steps
                  if isinstance(s.kernel, ConvKernel) and s.kernel.prologue]
        results.append((exe.forward(images), len(staged),
                        exe.program.arena(schedule, 5).shared_region.nbytes))
    (logits_a, staged_a, bytes_a), (logits_b, staged_b, bytes_b) = results
    assert (staged_a, staged_b) == (2, 0)
    np.testing.assert_array_equal(logits_a, logits_b)
    assert bytes_a < bytes_b
