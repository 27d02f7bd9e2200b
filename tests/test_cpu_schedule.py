"""How the cpu backend schedules the presets' inference (no kernel compiles): one kernel call
per fused node, the segments that take several small images per call, what lives in batch
buffers and why, and the split of each layer at batch 1."""

import pytest

import rescompile as rc
from rescompile.backends.cpu.schedule import build_schedule
from rescompile.backends.cpu.target import generic_target
from rescompile.compiler import lower
from rescompile.entries import make_entries


def _schedule(preset, dtype="float32"):
    lowered = lower(rc.preset(preset), "infer", dtype)
    entry = make_entries(lowered.graph, "infer")["forward"]
    return lowered, build_schedule(lowered.graph, entry, generic_target("avx2"), dtype)


def test_resnet164_is_one_call_per_fused_node():
    """One call per fused node, and before a Winograd layer cut into many channel panels (on
    AVX2 the third stage's 3x3 layers: 64 channels, 4 panels) its input transform."""
    lowered, schedule = _schedule("resnet164_cifar")
    names = [s.name for s in schedule.steps[1:]]
    staged = [name for name in names if name.endswith("/transform")]
    assert len(staged) == 18 and all(names[names.index(t) + 1] == t[:-len("/transform")]
                                     for t in staged)
    assert [n for n in names if n not in staged] == [n.name for n in lowered.graph.nodes
                                                     if n.phase == "forward"]
    assert schedule.steps[0].op == "copy"  # the fed images into a zero-bordered buffer
    assert [s.images for s in schedule.segments] == [1]
    assert list(schedule.batch_values) == [lowered.graph.outputs["logits"]]
    # 3x3 inputs are written bordered by the conv that makes them; none is copied
    bordered = [v for v in schedule.pads if not v.startswith("images")]
    assert len(bordered) == 54 and all(schedule.pads[v] == (1, 1, 1, 1) for v in bordered)


def test_resnet50_takes_several_7x7_images_per_call():
    _, schedule = _schedule("resnet50_imagenet")
    ops = [s.op for s in schedule.steps]
    assert ops[:3] == ["copy", "fused_conv2d", "max_pool"]
    assert ops.count("fused_conv2d") + ops.count("conv2d") == 53
    assert [s.images for s in schedule.segments] == [1, 2]
    late = schedule.steps[schedule.segments[1].begin]
    assert late.pixels == 49
    crossing = {v for v, why in schedule.batch_values.items() if "later segment" in why}
    # stage 4 starts at its first 7x7 layer (conv2, stride 2): what it reads from before
    assert crossing == {"unit_4_0/sub1/relu", "unit_3_5/sub_add/relu"}
    assert any("starts a segment" in text for _, text in schedule.remarks)


def test_a_conv_that_stages_its_rows_runs_tiles_outer():
    """ResNet-50's widest 1 x 1 layer (2048 -> 512 channels, 4 MiB of weights, past any
    core's L2) runs panel by panel in float32; in bfloat16 on AVX2 it stages each tile's rows
    widened, which panel by panel it would do once a panel, so it runs tile by tile."""
    for dtype, staged in (("float32", False), ("bfloat16", True)):
        _, schedule = _schedule("resnet50_imagenet", dtype)
        step = next(s for s in schedule.steps if s.name == "unit_4_1/sub1/conv1")
        assert step.kernel.stages_rows == staged
        assert step.fields["panels_outer"] == int(not staged), dtype


@pytest.mark.parametrize("preset, layer, split", [
    ("resnet164_cifar", "unit_1_5/sub2/conv2", "pixels"),  # 3x3, 16 channels at 32x32
    ("resnet164_cifar", "unit_3_5/sub2/conv2", "channels"),  # 3x3, 64 channels at 8x8
    ("resnet50_imagenet", "unit_1_1/sub2/conv2", "pixels"),  # 3x3, 64 channels at 56x56
    ("resnet50_imagenet", "unit_4_1/sub2/conv2", "channels"),  # 3x3, 512 channels at 7x7
])
def test_wide_layers_split_channels_at_batch_1(preset, layer, split):
    """Where a layer's weights outweigh its input, each thread takes part of the output
    channels (and reads part of the weights) instead of part of the pixels."""
    _, schedule = _schedule(preset)
    (step,) = [s for s in schedule.steps if s.name == layer]
    assert step.split == split


def test_describe_names_every_step_and_placement():
    _, schedule = _schedule("seed_small")
    text = schedule.describe()
    assert all(s.name in text for s in schedule.steps)
    assert "[thread]" in text and "[batch]" in text and "remark" in text
