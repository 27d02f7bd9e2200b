"""The ranks of a job, and the collectives data-parallel training needs.

A `World` is one process (`Solo`) or the ranks of an MPI job (`MpiWorld`). Every reduction
is summed in rank order 0, 1, ..., K-1 by a rule of our own, not by whatever order the MPI
library picks, so every rank holds the same bits and a run is reproducible for a given K.

The ops that exchange statistics (`sync_moments`, `rank_mean`) read `current()`: the world of
the job this process belongs to, `Solo` unless `joined` set another.
"""

from __future__ import annotations

import contextlib

import numpy as np


class Solo:
    """One process: every collective is the identity."""
    rank, size, local_size = 0, 1, 1

    def mean(self, buffer: np.ndarray) -> None:
        """In place: the mean of `buffer` over the ranks."""

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's `array`, stacked in rank order: [K, *shape]."""
        return np.asarray(array)[None]

    def broadcast(self, value):
        """Rank 0's `value` (a small Python object) on every rank."""
        return value

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        raise SystemExit(code)


class MpiWorld:
    """The ranks of `comm` (an mpi4py communicator)."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()
        local.Free()
        self._buffers: dict[tuple, tuple] = {}

    def mean(self, buffer: np.ndarray) -> None:
        """Reduce-scatter by hand, then all-gather: rank r receives slice r of every rank's
        buffer, sums the K slices in rank order and scales; the slices are then gathered back.
        Each element is reduced once, on one rank, so all ranks get the same bits; the traffic
        is that of a ring all-reduce, 2 (K-1)/K times the buffer per rank."""
        flat = buffer.reshape(-1)
        send, received, reduced, gathered = self._scratch(flat.size, flat.dtype)
        send.reshape(-1)[:flat.size] = flat
        self.comm.Alltoall(send, received)
        np.copyto(reduced, received[0])
        for slice_ in received[1:]:
            reduced += slice_
        reduced /= self.size
        self.comm.Allgather(reduced, gathered)
        flat[:] = gathered.reshape(-1)[:flat.size]

    def gather(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array)
        out = np.empty((self.size, *array.shape), array.dtype)
        self.comm.Allgather(array, out)
        return out

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int) -> None:
        self.comm.Abort(code)

    def _scratch(self, n: int, dtype) -> tuple:
        """Buffers for a reduction of n elements, allocated once per (n, dtype)."""
        key = (n, np.dtype(dtype).str)
        if key not in self._buffers:
            chunk = -(-n // self.size)
            self._buffers[key] = (np.zeros((self.size, chunk), dtype),
                                  np.empty((self.size, chunk), dtype),
                                  np.empty(chunk, dtype), np.empty((self.size, chunk), dtype))
        return self._buffers[key]


_current = Solo()


def current():
    return _current


@contextlib.contextmanager
def joined(world):
    """Run with `world` as the job's world (what the collective ops reduce over)."""
    global _current
    previous, _current = _current, world
    try:
        yield world
    finally:
        _current = previous
