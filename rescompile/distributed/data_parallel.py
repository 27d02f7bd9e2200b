"""One rank's data-parallel train step.

Each rank computes the loss, gradients and batch statistics of its share of the global batch
(`Executable.step_gradients`); one all-reduce takes their mean over the ranks, packed into a
buffer allocated once; every rank applies the same update (`apply_gradients`). The ranks
start from the same variables and apply the same bits, so their variables stay bitwise equal;
`check_every` steps, digests of every variable are compared across ranks to prove it.

The mean is what one process computes on the whole batch: the loss is a mean over images
and the shares are equal, so the global gradient is the mean of the ranks' gradients. Batch
statistics: with `batch_norm.sync` each rank already normalises with the global batch's
(so its mean over the ranks is that statistic again); without it, each rank normalises with
its own share's, and the moving averages take the mean over the ranks of those.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np


class ReplicasDiverged(RuntimeError):
    """The ranks' variables differ: a bug, or a rank that did not run the same program."""


class DataParallel:
    def __init__(self, exe, world, check_every: int = 0):
        self.exe, self.world, self.check_every = exe, world, check_every
        self.comm_seconds = 0.0  # the last step's all-reduce
        self._buffer = None
        if world.size > 1:
            world.barrier()  # ranks finish compiling at different times: no deadline here
            check_replicas(exe, world)

    def gradients(self, images, labels):
        """(loss, gradients, batch statistics) of the global batch, from this rank's share of
        it: the means over the ranks, identical on every rank."""
        loss, grads, statistics = self.exe.step_gradients(images, labels)
        if self.world.size > 1:
            loss, grads, statistics = self._mean(loss, grads, statistics)
        return loss, grads, statistics

    def train_step(self, images, labels) -> float:
        """One step on this rank's images and labels; returns the global batch's loss. One
        process runs the executable's fused step: there is nothing to exchange."""
        if self.world.size == 1:
            return self.exe.train_step(images, labels)
        start = time.perf_counter()
        loss, grads, statistics = self.gradients(images, labels)
        self.exe.check_loss(loss)
        self.exe.apply_gradients(grads, statistics)
        if self.check_every and self.exe.step % self.check_every == 0:
            check_replicas(self.exe, self.world)
        self.world.deadline.record(time.perf_counter() - start)
        return loss

    def _mean(self, loss, grads: dict, statistics: dict):
        """Loss, gradients and statistics as one buffer, its mean over the ranks, and the parts
        as views of it (in name order, so every rank packs the same layout)."""
        parts = [("loss", np.asarray(loss))] + sorted(grads.items()) + sorted(statistics.items())
        if self._buffer is None:
            size = sum(np.size(value) for _, value in parts)
            self._buffer = np.empty(size, self.exe.array_dtype)
        views, offset = {}, 0
        for name, value in parts:
            view = self._buffer[offset:offset + np.size(value)]
            view[:] = np.ravel(value)
            views[name] = view.reshape(np.shape(value))
            offset += view.size
        start = time.perf_counter()
        self.world.mean(self._buffer)
        self.comm_seconds = time.perf_counter() - start
        return (float(self._buffer[0]), {n: views[n] for n in grads},
                {n: views[n] for n in statistics})


def check_replicas(exe, world) -> None:
    """Every variable's digest on every rank against rank 0's; names the first that differs."""
    names = sorted(exe.state)
    digests = np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(exe.state[n])
                                                       .tobytes(), digest_size=8).digest(),
                                       "little") for n in names], np.uint64)
    table = world.gather(digests, "variable digests")
    for rank in range(1, world.size):
        differs = np.flatnonzero(table[rank] != table[0])
        if differs.size:
            raise ReplicasDiverged(f"step {exe.step}: variable {names[differs[0]]!r} differs "
                                   f"between rank 0 and rank {rank} ({differs.size} variables "
                                   f"differ)")
