"""Determinism, the variable mirror, device-array feeds and results, launch counts, errors."""

import numpy as np
import pytest

from rescompile.backends import cuda as cuda_backend
from rescompile.backends.cuda.memory import variable_layout
from rescompile.backends.cuda.plan import build_plan
from rescompile.entries import kept_values
from rescompile.compiler import lower
from rescompile.entries import make_entries
from rescompile.ir import Graph

from cuda_helpers import BATCH, TINY, Trio, feeds


def test_unchanged_variables_are_not_uploaded_again():
    trio = Trio("train")
    feed = feeds(trio.lowered)
    trio.cuda.run("forward", feed)
    uploads = trio.cuda.uploads
    trio.cuda.run("forward", feed)
    assert trio.cuda.uploads == uploads


def test_train_step_results_stay_on_the_device_and_runs_are_bit_identical():
    """Feeding back what a step returned uploads nothing; the next step's loss matches the
    reference on those values; two runs give bit-identical outputs (no float atomics)."""
    trio = Trio("train")
    feed = feeds(trio.lowered)
    results = trio.cuda.run("train_step", feed)
    news = {k[4:]: v for k, v in trio.graph.outputs.items() if k.startswith("new/")}
    second = dict(feed, **{var: results[value] for var, value in news.items()})
    uploads = trio.cuda.uploads
    again = trio.cuda.run("loss_and_grads", second)
    assert trio.cuda.uploads == uploads
    expected = trio.ref32.run("loss_and_grads", second)
    loss = trio.graph.outputs["loss"]
    assert abs(float(again[loss]) - float(expected[loss])) <= 1e-5 * abs(float(expected[loss]))
    repeat = trio.cuda.run("loss_and_grads", second)
    for name in again:
        assert np.array_equal(again[name], repeat[name]), name


def test_device_arrays_in_and_out():
    from numba import cuda
    trio = Trio("infer", return_device=True)
    feed = feeds(trio.lowered)
    trio.cuda.run("prepare", feed)
    host = trio.cuda.run("forward", dict(feed))
    feed["images"] = cuda.to_device(feed["images"])
    (logits,) = trio.cuda.run("forward", feed).values()
    assert not isinstance(logits, np.ndarray)
    assert np.array_equal(logits.copy_to_host(), next(iter(host.values())).copy_to_host())


def test_launch_counts_are_reported():
    """The launches a run made, as reviewed: 9 convs with their epilogues, the strided 3x3 conv
    and the global pool taking two launches each, and the dense layer; the 7 weight folds run
    in prepare."""
    trio = Trio("infer")
    trio.cuda.run("prepare", feeds(trio.lowered))
    trio.cuda.run("forward", feeds(trio.lowered))
    assert trio.cuda.launch_counts == {"prepare": 7, "forward": 13}
    train = Trio("train")
    counts = cuda_backend.count_launches(train.graph, make_entries(train.graph, "train"), BATCH,
                                         target=cuda_backend.SIMULATOR)
    assert counts["train_step"] < counts["loss_and_grads"] + 3
    layout = variable_layout(train.graph)
    plan = build_plan(train.graph, make_entries(train.graph, "train")["train_step"], layout,
                      BATCH, "float32", cuda_backend.SIMULATOR)
    updates = [launch.node for launch in plan.launches if launch.node.startswith("update/") or
               launch.node.startswith(("momentum_update", "moving_average"))]
    assert len(updates) == 2, updates  # every optimizer update in one kernel, stats in one


def test_activations_share_planned_buffers_and_results_are_unchanged():
    """Activations live in one arena laid out by memory.py, smaller than all of them side by
    side; forward, backward (reading forward's kept values) and train_step (in-place updates)
    give bit-identical results with and without the reuse."""
    shared, alone = Trio("train"), Trio("train", reuse_memory=False)
    feed = feeds(shared.lowered)
    dlogits = np.random.default_rng(1).standard_normal((BATCH, 10)).astype(np.float32)
    backward = dict(feed, **{shared.graph.outputs["grad/logits"]: dlogits})
    for entry, fed in [("forward", feed), ("backward", backward), ("train_step", feed)]:
        got, expected = shared.cuda.run(entry, fed), alone.cuda.run(entry, fed)
        for name in expected:
            assert np.array_equal(got[name], expected[name]), (entry, name)
        plan = shared.cuda._bound[(entry, BATCH)].plan.memory
        own = alone.cuda._bound[(entry, BATCH)].plan.memory
        assert len(own.buffer_bytes) == len(own.buffer_of)  # no reuse: a buffer per value
        assert own.peak_bytes == own.total_bytes == plan.total_bytes
        assert len(plan.buffer_bytes) < len(plan.buffer_of), entry
        assert plan.peak_bytes < own.peak_bytes, entry


def test_scratch_is_pooled_and_planned_values_never_alias_variables():
    """Kernel scratch is one pool per dtype, not one buffer per node; the in-place updates write
    the variable arena V, which no planned activation shares."""
    train = Trio("train")
    entries = make_entries(train.graph, "train")
    layout = variable_layout(train.graph)
    entry = entries["train_step"]
    plan = build_plan(train.graph, entry, layout, BATCH, "float32", cuda_backend.SIMULATOR,
                      kept_values(entries, entry))
    assert set(plan.pools) == {d for _, d in plan.scratch.values()}
    assert sum(plan.pools.values()) < sum(n for n, _ in plan.scratch.values())
    assert all(ref.kind != "scratch" for launch in plan.launches for ref in launch.args)
    in_v = {v for v, ref in plan.views.items() if ref.name == "V"}
    assert in_v and in_v.isdisjoint(plan.memory.buffer_of)
    assert in_v == {v for k, v in train.graph.outputs.items() if k.startswith("new/")} & in_v


def test_unknown_op_fails_at_compile_time_naming_the_node():
    from rescompile.ops.registry import OPS, OpDef
    OPS["mystery"] = OpDef("mystery", "epilogue", shape=lambda a, x: [x],
                           reference=lambda a, x: (x,))
    try:
        graph = Graph(dtype="float32")
        graph.add_input("images", ("N", 2), "data")
        graph.add_node("mystery", ["images"], name="odd")
        entry = type("E", (), {"nodes": tuple(graph.nodes), "name": "e"})
        with pytest.raises(cuda_backend.UnsupportedOpError, match="'odd'.*'mystery'"):
            cuda_backend.compile_program(graph, {"e": entry})
    finally:
        del OPS["mystery"]


def test_kernel_sources_are_cached_by_hash(tmp_path):
    lowered = lower(TINY, "infer", "float32", backend="cuda")
    entries = make_entries(lowered.graph, "infer")
    program = cuda_backend.compile_program(lowered.graph, entries, cache_dir=tmp_path)
    program.run("prepare", feeds(lowered))
    files = sorted((tmp_path / "cuda").glob("k_*.py"))
    assert files and all("@cuda.jit(cache=True)" in f.read_text() for f in files)


def test_train_step_in_halves_is_the_train_step():
    """step_gradients then apply_gradients (data-parallel training's halves) give the fused
    train step's bits; a fed gradient that a fused update reads from its place in the arena
    is copied there. Synchronised batch norm is refused with one line."""
    import rescompile as rc
    whole = rc.compile(TINY, mode="train", backend="cuda", dtype="float64", seed=1)
    halves = rc.compile(TINY, mode="train", backend="cuda", dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((BATCH, 8, 8, 3)), rng.integers(0, 10, BATCH)
    loss = whole.train_step(images, labels)
    split_loss, grads, stats = halves.step_gradients(images, labels)
    halves.apply_gradients(grads, stats)
    assert split_loss == loss
    for name, value in whole.state.items():
        assert np.array_equal(halves.state[name], value), name
    sync = dict(TINY, batch_norm={"sync": True})
    with pytest.raises(rc.UsageError, match="batch_norm.sync needs the cpu or reference"):
        rc.compile(sync, mode="train", backend="cuda")
