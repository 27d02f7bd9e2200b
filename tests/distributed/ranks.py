"""Run under `mpiexec -n 2` by tests/test_distributed.py; rank 0 writes what it measured as
JSON to the path given last.

    ranks.py parity BACKEND OUT   sync and per-rank batch norm against one process
    ranks.py fail HOW OUT         rank 1 fails at its third step (HOW: raise or kill)
    ranks.py silent BACKEND OUT   rank 1 never comes to the first exchange
"""

import hashlib
import json
import os
import signal
import sys
import time

import numpy as np

import rescompile as rc
from rescompile.distributed import Solo, joined
from rescompile.distributed.data_parallel import DataParallel, check_replicas
from rescompile.distributed.launch import failing_together, world_for

BATCH, STEPS, SEED = 8, 4, 3


def spec(sync: bool) -> dict:
    return {"name": "ranks", "model": {
        "input": [8, 8, 3], "num_classes": 5, "stem": "cifar", "stem_filters": 4,
        "unit": "bottleneck", "preactivation": True, "stride_on": "conv1", "padding": "same",
        "stages": [{"filters": 8, "units": 1, "stride": 1},
                   {"filters": 16, "units": 1, "stride": 2}],
        "activate_before_residual": [True, False], "relu_leakiness": 0.1},
        "batch_norm": {"sync": sync, "decay": 0.8},
        "train": {"batch_size": BATCH, "weight_decay": 1e-3, "learning_rate": [[0, 0.1]]}}


def batches():
    """The same global batches on every rank: random images, labels of every class."""
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((BATCH, 8, 8, 3)) * 2 + 0.5, rng.integers(0, 5, BATCH))
            for _ in range(STEPS)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1.0))


def worst(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(rel_err(a[k], b[k]) for k in b)


def parity(world, backend: str) -> dict:
    share = slice(world.rank * BATCH // world.size, (world.rank + 1) * BATCH // world.size)
    data, results = batches(), {}
    for sync in (True, False):
        exe = rc.compile(spec(sync), mode="train", backend=backend, dtype="float64", seed=SEED)
        trainer = DataParallel(exe, world)
        images, labels = data[0]
        loss, grads, stats = trainer.gradients(images[share], labels[share])
        # Views of the reduction's buffer, which the next step overwrites.
        grads = {k: v.copy() for k, v in grads.items()}
        stats = {k: v.copy() for k, v in stats.items()}
        exe.apply_gradients(grads, stats)
        after_one = {k: v.copy() for k, v in exe.state.items()}
        for images, labels in data[1:]:
            trainer.train_step(images[share], labels[share])
        check_replicas(exe, world)
        if world.rank == 0:
            with joined(Solo()):
                expected = (one_process(sync, backend, data) if sync
                            else rank_means(backend, data[0], world.size))
            results["sync" if sync else "per_rank"] = {
                "loss": rel_err(loss, expected["loss"]),
                "gradients": worst(grads, expected["grads"]),
                "statistics": worst(stats, expected["stats"]),
                "after_one_step": worst(after_one, expected["after_one"]),
                **({"after_all_steps": worst(exe.state, expected["after_all"])} if sync else {}),
                "digests_equal": bool((world.gather(digest(exe)) == digest(exe)).all())}
        else:
            world.gather(digest(exe))
    return results


def one_process(sync: bool, backend: str, data) -> dict:
    exe = rc.compile(spec(sync), mode="train", backend=backend, dtype="float64", seed=SEED)
    loss, grads, stats = exe.step_gradients(*data[0])
    exe.apply_gradients(grads, stats)
    after_one = {k: v.copy() for k, v in exe.state.items()}
    for images, labels in data[1:]:
        exe.train_step(images, labels)
    return {"loss": loss, "grads": grads, "stats": stats, "after_one": after_one,
            "after_all": exe.state}


def rank_means(backend: str, batch, ranks: int) -> dict:
    """What K ranks with per-rank statistics must compute: each share's gradients and
    statistics on its own, then their mean; the update from those."""
    images, labels = batch
    exe = rc.compile(spec(False), mode="train", backend=backend, dtype="float64", seed=SEED)
    shares = [slice(k * BATCH // ranks, (k + 1) * BATCH // ranks) for k in range(ranks)]
    parts = [exe.step_gradients(images[s], labels[s]) for s in shares]
    mean = lambda dicts: {n: sum(d[n] for d in dicts) / ranks for n in dicts[0]}  # noqa: E731
    grads, stats = mean([p[1] for p in parts]), mean([p[2] for p in parts])
    exe.apply_gradients(grads, stats)
    return {"loss": sum(p[0] for p in parts) / ranks, "grads": grads, "stats": stats,
            "after_one": exe.state}


def digest(exe) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.sha256(exe.state[n].tobytes()).digest()[:8]
                                  for n in sorted(exe.state)), np.uint64)


def fail(world, how: str, out: str) -> None:
    """Train with rank 1 failing at its third step; the job must end, not hang."""
    from rescompile.runtime import Executable
    from rescompile.training import TrainConfig, train
    original = Executable.step_gradients

    def failing(self, images, labels):
        if world.rank == 1 and self.step == 2:
            with open(out + ".failed_at", "w") as f:
                f.write(repr(time.time()))
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise rc.InputError("injected failure on rank 1")
        return original(self, images, labels)

    Executable.step_gradients = failing
    train(TrainConfig(spec=rc.spec.load_spec(spec(False)), data="synthetic", steps=1000,
                      backend="reference", dtype="float64"))


SILENT_DEADLINE_S = 2


def silent(world, backend: str, out: str) -> None:
    """Rank 1 sleeps instead of stepping: rank 0's first exchange of batch statistics (from
    inside the cpu backend's driver) must give up at the deadline and name rank 1."""
    exe = rc.compile(spec(True), mode="train", backend=backend, dtype="float64", seed=SEED)
    world.barrier()
    if world.rank == 1:
        time.sleep(120)
        return
    with open(out + ".started_at", "w") as f:
        f.write(repr(time.time()))
    images, labels = batches()[0]
    exe.step_gradients(images[:BATCH // 2], labels[:BATCH // 2])


def main() -> None:
    command, arg, out = sys.argv[1:4]
    world = world_for(True, SILENT_DEADLINE_S if command == "silent" else None)
    if command == "fail":
        fail(world, arg, out)
        return
    if command == "silent":
        with failing_together(world), joined(world):
            silent(world, arg, out)
        return
    with failing_together(world), joined(world):
        results = parity(world, arg)
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
