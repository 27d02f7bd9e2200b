"""Data-parallel pieces that need no MPI: a train step in halves (step_gradients, then
apply_gradients) is the fused train step, bit for bit, on every backend and with synchronised
batch norm (the identity on one process); the ranks' batch shares make up the one-process
batch; a run on one process has no collectives to fail. The ranks themselves:
tests/test_distributed.py (and tests/cuda for the CUDA backend's halves)."""

import numpy as np
import pytest

import rescompile as rc
from conftest import tiny_spec
from rescompile.backends.cpu.steps import HostStep, Step
from rescompile.data import BatchStream, Normalization, load_dataset
from rescompile.distributed import Solo
from rescompile.distributed.data_parallel import DataParallel, check_replicas
from rescompile.distributed.launch import failing_together, world_for
from rescompile.distributed.world import Deadline

SYNC = tiny_spec().replace(batch_norm={"sync": True})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spec", [tiny_spec(), SYNC], ids=["per-rank", "sync"])
def test_train_step_in_halves_is_the_train_step(spec, backend, dtype):
    whole = rc.compile(spec, mode="train", backend=backend, dtype=dtype, seed=4)
    halves = rc.compile(spec, mode="train", backend=backend, dtype=dtype, seed=4)
    trainer = DataParallel(halves, Solo())
    rng = np.random.default_rng(2)
    for _ in range(2):
        images = rng.standard_normal((6, *spec.model.input)) * 1.5 + 0.3
        labels = rng.integers(0, spec.model.num_classes, 6)
        loss, grads, statistics = trainer.gradients(images, labels)
        halves.apply_gradients(grads, statistics)
        assert loss == whole.train_step(images, labels)
    assert halves.step == whole.step == 2
    for name, value in whole.state.items():
        assert np.array_equal(halves.state[name], value), name


def test_sync_batch_norm_changes_only_the_training_graph():
    """On one process the synchronised statistics are the batch's: sync and per-rank specs
    train to the same bits, through the same fused kernels (the synchronised gradient's halves
    take the ReLU gradient, and its sums join the data gradient's kernel, as the per-rank one's
    do); inference graphs are identical."""
    graph = rc.compile(SYNC, mode="train").graph
    ops = {n.op for n in graph.nodes}
    assert {"sync_moments", "rank_mean", "batch_norm_relu_grad_apply"} <= ops
    # one exchange forward and one backward per batch norm: the moments together, the
    # gradient's two sums together
    norms = sum(n.op == "batch_norm" for n in rc.compile(SYNC, mode="train",
                                                         optimize=False).graph.nodes)
    exchanges = [n for n in graph.nodes if n.op in ("sync_moments", "rank_mean")]
    assert len(exchanges) == 2 * norms and all(len(n.inputs) == 2 for n in exchanges)
    assert "relu_grad" not in ops and "batch_norm_grad_sums" not in ops
    assert any(n.attrs.get("sums") for n in graph.nodes)
    infer = [rc.compile(s, mode="infer").graph.nodes for s in (tiny_spec(), SYNC)]
    assert [(n.op, n.inputs) for n in infer[0]] == [(n.op, n.inputs) for n in infer[1]]
    a, b = (rc.compile(s, mode="train", backend="cpu", dtype="float64", seed=1)
            for s in (tiny_spec(), SYNC))
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((4, 8, 8, 3)), rng.integers(0, 5, 4)
    assert a.train_step(images, labels) == b.train_step(images, labels)
    for name, value in a.state.items():
        np.testing.assert_array_equal(b.state[name], value, err_msg=name)


def test_cpu_exchanges_run_inside_the_driver():
    """On the cpu backend every exchange is a kernel step (`cpu/llvm/exchange.py`), so a
    synchronised step runs in as many driver runs, around as many host steps, as a per-rank
    one: none is cut at an exchange."""
    layouts = {}
    for name, spec in (("per-rank", tiny_spec()), ("sync", SYNC)):
        program = rc.compile(spec, mode="train", backend="cpu").program
        steps = program.plan("step_gradients").schedule.steps
        host = [isinstance(s, HostStep) for s in steps]
        runs = sum(1 for i, h in enumerate(host) if not h and (i == 0 or host[i - 1]))
        exchanges = [s for s in steps if s.op in ("sync_moments", "rank_mean")]
        layouts[name] = runs, sum(host), len(exchanges)
        assert all(isinstance(s, Step) and "link" in s.uses for s in exchanges)
    norms = sum(n.op == "batch_norm" for n in rc.compile(SYNC, mode="train",
                                                         optimize=False).graph.nodes)
    assert layouts["sync"] == layouts["per-rank"][:2] + (2 * norms,)
    assert layouts["per-rank"][2] == 0


def test_apply_gradients_names_what_is_missing():
    exe = rc.compile(tiny_spec(), mode="train", dtype="float64")
    rng = np.random.default_rng(0)
    _, grads, stats = exe.step_gradients(rng.standard_normal((2, 8, 8, 3)), [1, 2])
    del grads["logit/DW"]
    with pytest.raises(rc.InputError, match="'logit/DW' is missing"):
        exe.apply_gradients(grads, stats)
    grads["logit/DW"] = np.full((16, 5), np.nan)
    with pytest.raises(rc.InputError, match="logit/DW"):
        exe.apply_gradients(grads, stats)
    assert exe.step == 0


@pytest.mark.parametrize("augment, crop, normalize", [(True, True, "image"),
                                                      (False, True, "image"),
                                                      (True, False, "channel")])
def test_rank_shares_make_up_the_batch(augment, crop, normalize):
    data = load_dataset("synthetic", input_shape=(8, 8, 3), num_classes=5, seed=1)
    options = dict(augment=augment, crop=crop,
                   normalize=Normalization.fit(normalize, data.train_images))
    whole = BatchStream(data, 12, seed=5, **options)
    shares = [BatchStream(data, 12, seed=5, rank=r, ranks=3, **options) for r in range(3)]
    for step in (0, 7, 30):
        images, labels = whole.batch(step)
        parts = [s.batch(step) for s in shares]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), images)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), labels)
    with pytest.raises(rc.InputError, match="does not split evenly across 5 ranks"):
        BatchStream(data, 12, seed=5, rank=0, ranks=5)


def test_one_process_has_no_collectives_to_fail():
    world = world_for(False)
    assert isinstance(world, Solo) and world.size == 1
    buffer = np.arange(5.0)
    world.mean(buffer)
    assert np.array_equal(buffer, np.arange(5.0))
    exe = rc.compile(tiny_spec(), mode="train")
    check_replicas(exe, world)
    with pytest.raises(ValueError, match="passes through"):
        with failing_together(world):
            raise ValueError("passes through")


def test_the_exchange_deadline_is_several_median_steps_and_at_least_a_minute():
    deadline = Deadline()
    assert deadline.seconds() == Deadline.FLOOR_S           # no step measured yet
    for step_s in (1.0, 30.0, 20.0):
        deadline.record(step_s)
    assert deadline.seconds() == Deadline.FACTOR * 20.0      # the median, not the mean
    assert Deadline(2.5).seconds() == 2.5                   # --exchange-timeout, as given
    with pytest.raises(rc.UsageError, match="must be > 0 seconds"):
        Deadline(0)
