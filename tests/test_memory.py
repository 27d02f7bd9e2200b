"""The memory planner: buffers never hold two live values at once, inference peak stays a small
multiple of the largest activation, and training reports what it saves for the backward."""

import pytest

from rescompile.cli import main
from rescompile.compiler import lower
from rescompile.entries import make_entries
from rescompile.memory import plan_memory
from conftest import EXAMPLES, tiny_spec


def entry_plan(lowered, entry, batch):
    e = make_entries(lowered.graph, lowered.mode)[entry]
    return plan_memory(lowered.graph, e.nodes, batch, set(e.fetches))


@pytest.fixture(scope="module")
def resnet164_infer():
    return lower(EXAMPLES / "resnet164_cifar.toml", "infer", "float32")


def test_resnet164_inference_peak_is_under_four_largest_activations(resnet164_infer):
    plan = entry_plan(resnet164_infer, "forward", 128)
    largest = 128 * 32 * 32 * 64 * 4
    assert plan.largest_bytes == largest
    assert plan.live_peak_bytes <= plan.peak_bytes < 4 * largest
    assert plan.peak_bytes < plan.total_bytes / 10
    assert plan.scratch_bytes > 0 and plan.saved_bytes == 0


@pytest.mark.parametrize("mode, entry", [("infer", "forward"), ("train", "train_step")])
def test_no_buffer_holds_two_live_values(mode, entry):
    lowered = lower(tiny_spec(), mode)
    plan = entry_plan(lowered, entry, 4)
    by_buffer = {}
    for value, buffer in plan.buffer_of.items():
        assert plan.value_bytes[value] <= plan.buffer_bytes[buffer]
        by_buffer.setdefault(buffer, []).append(plan.lifetime[value])
    for spans in by_buffer.values():
        spans.sort()
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))


def test_kept_values_live_to_the_end():
    lowered = lower(tiny_spec(), "train")
    e = make_entries(lowered.graph, "train")["train_step"]
    plan = plan_memory(lowered.graph, e.nodes, 2, set(e.fetches))
    assert all(plan.lifetime[v][1] == len(e.nodes) for v in e.fetches if v in plan.lifetime)


def test_training_saves_less_after_fusion():
    spec = EXAMPLES / "seed_small.toml"
    plain = entry_plan(lower(spec, "train", optimize=False), "train_step", 8)
    fused = entry_plan(lower(spec, "train"), "train_step", 8)
    assert 0 < fused.saved_bytes < plain.saved_bytes


def test_dump_memory_reports_the_plan(capsys):
    assert main(["dump", str(EXAMPLES / "seed_small.toml"), "--memory", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "memory plan, batch 16" in out and "peak activation bytes" in out
    assert "kernel scratch" in out
