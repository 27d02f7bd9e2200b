"""Memory: the liveness library (no buffer holds two live values, kept values live to the
end, training saves less after fusion), and what each backend really allocates, as
`rescompile dump --memory` reports it: the cpu arena's regions and packed weights, the cuda
plan's device arenas."""

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cuda.plan import memory_report
from rescompile.cli import main
from rescompile.compiler import lower
from rescompile.entries import make_entries
from rescompile.memory import plan_memory
from conftest import EXAMPLES, tiny_spec

BATCH = 128
LARGEST = BATCH * 32 * 32 * 64 * 4  # ResNet-164's largest activation at batch 128, float32


def entry_plan(lowered, entry, batch):
    e = make_entries(lowered.graph, lowered.mode)[entry]
    return plan_memory(lowered.graph, e.nodes, batch, set(e.fetches))


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


@pytest.fixture(scope="module")
def resnet164_arena():
    exe = rc.compile(rc.preset("cifar-resnet164"), mode="infer", backend="cpu")
    program = exe.program
    return exe, program, program.arena(program.plan("forward").schedule, BATCH)


def test_cpu_arena_holds_each_threads_images_and_the_logits(resnet164_arena):
    """Depth first, the cpu backend keeps one image's activations per thread (about 3x the
    largest one's, reused by liveness; no conv3 writes the next unit's BN-ReLU, which its
    conv1 applies as it reads, `fuse_prologues`) and a batch buffer for the logits only: 10.6
    MiB at batch 128 with the packed weights, where a layer-by-layer plan needs 112 MiB of
    activations."""
    _, program, arena = resnet164_arena
    assert tuple(arena.batch_buffers) == program.plan("forward").schedule.fetches
    assert sum(b.nbytes for b in arena.batch_buffers.values()) == BATCH * 10 * 4
    assert arena.thread_region.nbytes == 761_152
    assert 2 * LARGEST / BATCH < arena.thread_region.nbytes < 3 * LARGEST / BATCH
    assert arena.thread_memory.nbytes == 2 * arena.thread_region.nbytes
    assert arena.shared_memory.nbytes == 0  # 128 images divide evenly between the 2 threads


def test_cpu_arena_counts_the_weights_it_packs(resnet164_arena):
    exe, program, arena = resnet164_arena
    before = arena.packed_bytes
    exe.forward(np.zeros((BATCH, 32, 32, 3), np.float32))
    # 3,483,648 bytes of them are the 3x3 layers', 16/9 of that as Winograd's (6,193,152)
    assert before == sum(packed.nbytes for _, packed in program._packed.values()) == 9_431_744


def test_cuda_plan_peaks_at_three_and_a_half_largest_activations():
    lowered = lower(rc.preset("cifar-resnet164"), "infer", backend="cuda")
    plan = entry_plan(lowered, "forward", BATCH)
    assert (plan.largest_bytes, len(plan.buffer_bytes)) == (LARGEST, 5)
    assert plan.peak_bytes == 3.5 * LARGEST
    assert plan.live_peak_bytes <= plan.peak_bytes < plan.total_bytes / 20
    report = memory_report(lowered.graph, make_entries(lowered.graph, "infer"), "forward",
                           BATCH)
    assert f"activations     {plan.peak_bytes:,} bytes" in report


@pytest.mark.parametrize("backend, words", [
    ("cpu", ["cpu arena, batch 16", "per thread", "packed weights"]),
    ("cuda", ["cuda device memory, entry forward, batch 16", "activations", "peak = 3.50x"])])
def test_dump_memory_reports_what_the_backend_allocates(backend, words, capsys):
    assert main(["dump", str(EXAMPLES / "seed_small.toml"), "--memory", "--batch", "16",
                 "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words), out
