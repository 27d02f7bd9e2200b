"""How the cpu backend groups the presets' schedules into unit kernels (no kernel compiles):
every bottleneck unit of ResNet-164 and ResNet-50 inference is one kernel, training keeps the
per-node path, and each refusal says why."""

import pytest

import rescompile as rc
from rescompile.backends.cpu.templates.unit import find_units
from rescompile.compiler import lower
from rescompile.entries import make_entries


def _units(preset, mode):
    lowered = lower(rc.preset(preset), mode, "float32")
    entries = make_entries(lowered.graph, mode)
    forward = entries["forward"]
    later = [e for e in entries.values() if e.after == "forward"]
    keep = set(forward.fetches) | {i for e in later for n in e.nodes for i in n.inputs}
    return find_units(lowered.graph, forward.nodes, keep)


@pytest.mark.parametrize("preset, units", [("resnet164_cifar", 54), ("resnet50_imagenet", 16)])
def test_every_inference_unit_is_one_kernel(preset, units):
    groups, refused = _units(preset, "infer")
    assert len(groups) == units
    assert all(len(g.members) == 3 for g in groups)
    assert all(m.op == "fused_conv2d" for g in groups for m in g.members)
    # the projection stays its own kernel: it reads the unit's input, not conv2's output
    assert not any("project" in m.name for g in groups for m in g.members)
    assert all(isinstance(reason, str) and reason for reason in refused.values())


def test_training_keeps_per_node_kernels():
    groups, _ = _units("resnet164_cifar", "train")
    assert groups == []  # the backward pass reads every conv output
