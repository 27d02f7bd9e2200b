"""The ranks of a job, and the collectives data-parallel training needs.

A `World` is one process (`Solo`) or the ranks of an MPI job (`MpiWorld`). Every reduction
is summed in rank order 0, 1, ..., K-1 by a rule of our own, not by whatever order the MPI
library picks, so every rank holds the same bits and a run is reproducible for a given K.

The exchanges of a step (`mean`, `gather`) are point-to-point messages watched by a deadline
(`Deadline`): a rank whose host died or whose link was cut leaves the others waiting for its
messages, with nothing from MPI to say so (TCP waits for minutes). When the deadline passes,
the waiting rank raises a ResourceError naming the ranks it has heard nothing from, and the
job ends (`launch.failing_together`) instead of hanging. The deadline is, unless set, several
times the median step, and never less than a minute.

The ops that exchange statistics (`sync_moments`, `rank_mean`) read `current()`: the world of
the job this process belongs to, `Solo` unless `joined` set another.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ResourceError, UsageError


class Deadline:
    """How long an exchange may wait for the other ranks: `fixed` seconds if given, else
    FACTOR times the median of the recent steps, and at least FLOOR_S."""
    FLOOR_S = 60.0
    FACTOR = 5
    WINDOW = 50  # steps the median is taken over

    def __init__(self, fixed: float | None = None):
        if fixed is not None and not fixed > 0:
            raise UsageError(f"the exchange deadline must be > 0 seconds, got {fixed}")
        self.fixed = fixed
        self._steps: deque = deque(maxlen=self.WINDOW)

    def record(self, step_s: float) -> None:
        self._steps.append(step_s)

    def seconds(self) -> float:
        if self.fixed is not None:
            return self.fixed
        typical = statistics.median(self._steps) if self._steps else 0.0
        return max(self.FLOOR_S, self.FACTOR * typical)


class Solo:
    """One process: every collective is the identity."""
    rank, size, local_size = 0, 1, 1

    def mean(self, buffer: np.ndarray) -> None:
        """In place: the mean of `buffer` over the ranks."""

    def gather(self, array: np.ndarray, what: str = "values") -> np.ndarray:
        """Every rank's `array`, stacked in rank order: [K, *shape]; `what` it is names it in
        an error."""
        return np.asarray(array)[None]

    def broadcast(self, value):
        """Rank 0's `value` (a small Python object) on every rank."""
        return value

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        raise SystemExit(code)


def silence(what: str, ranks, limit: float) -> ResourceError:
    """The error of an exchange of `what` that heard nothing from `ranks` within `limit`
    seconds."""
    return ResourceError(
        f"exchanging {what}: rank(s) {', '.join(map(str, sorted(ranks)))} did not answer "
        f"within {limit:.3g} s (the exchange deadline, --exchange-timeout); is its host down "
        f"or its link cut?")


@dataclass(frozen=True)
class NativeMpi:
    """A communicator as native code calls MPI on it: its handle and MPI_BYTE's (as integers
    of `handle_bytes`), the bytes of an MPI_Request and an MPI_Status, and the addresses of
    MPI_Isend, MPI_Irecv and MPI_Test in the library mpi4py loaded. These are facts of the
    MPI library (MPICH's handles are ints, Open MPI's pointers), read from mpi4py, never
    assumed."""
    comm: int
    byte: int
    handle_bytes: int
    request_bytes: int
    status_bytes: int
    isend: int
    irecv: int
    test: int

    @classmethod
    def of(cls, comm) -> NativeMpi:
        import ctypes
        from mpi4py import MPI
        if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
            raise UsageError("synchronised batch norm on the cpu backend exchanges from the "
                             "driver's threads: MPI must be initialised with at least "
                             "MPI_THREAD_SERIALIZED (mpi4py's default is MULTIPLE)")
        handle_bytes = MPI._sizeof(MPI.Comm)
        if MPI._sizeof(MPI.Datatype) != handle_bytes:
            raise UsageError("this MPI library's communicator and datatype handles differ "
                             "in size; the cpu backend cannot call it")
        # dlsym on mpi4py's extension module searches the MPI library it was linked with
        library = ctypes.CDLL(MPI.__file__, mode=getattr(os, "RTLD_NOLOAD", 0))
        address = {name: ctypes.cast(getattr(library, f"MPI_{name.capitalize()}"),
                                     ctypes.c_void_p).value
                   for name in ("isend", "irecv", "test")}
        return cls(comm.handle, MPI.BYTE.handle, handle_bytes, MPI._sizeof(MPI.Request),
                   MPI._sizeof(MPI.Status), **address)


class MpiWorld:
    """The ranks of `comm` (an mpi4py communicator)."""
    MEAN_TAGS = (101, 102)   # message tags: the two phases of `mean`
    GATHER_TAG = 103
    ABORT_GRACE_S = 0.5

    def __init__(self, comm, deadline: Deadline | None = None):
        from mpi4py import MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.deadline = deadline or Deadline()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()
        local.Free()
        self._buffers: dict[tuple, tuple] = {}
        self._native: NativeMpi | None = None

    def mean(self, buffer: np.ndarray) -> None:
        """Reduce-scatter by hand, then all-gather: rank r receives slice r of every rank's
        buffer, sums the K slices in rank order and scales; the slices are then gathered back.
        Each element is reduced once, on one rank, so all ranks get the same bits; the traffic
        is that of a ring all-reduce, 2 (K-1)/K times the buffer per rank."""
        flat = buffer.reshape(-1)
        send, received, reduced, gathered = self._scratch(flat.size, flat.dtype)
        send.reshape(-1)[:flat.size] = flat
        self._exchange(lambda peer: send[peer], received, self.MEAN_TAGS[0], "the gradients")
        np.copyto(reduced, received[0])
        for slice_ in received[1:]:
            reduced += slice_
        reduced /= self.size
        self._exchange(lambda peer: reduced, gathered, self.MEAN_TAGS[1], "the gradients")
        flat[:] = gathered.reshape(-1)[:flat.size]

    def gather(self, array: np.ndarray, what: str = "values") -> np.ndarray:
        array = np.ascontiguousarray(array)
        out = np.empty((self.size, *array.shape), array.dtype)
        self._exchange(lambda peer: array, out, self.GATHER_TAG, what)
        return out

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def places(self) -> list[tuple[str, int]]:
        """(host name, pid) of every rank, in rank order (blocking: for the start only)."""
        return self.comm.allgather((socket.gethostname(), os.getpid()))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int) -> None:
        """End every rank with `code`. The launcher forwards a rank's output through a pipe
        it reads between other work: aborting right after a print can end the job before
        the line is read (Hydra loses it about one time in ten on a loaded machine), so the
        abort waits ABORT_GRACE_S first."""
        time.sleep(self.ABORT_GRACE_S)
        self.comm.Abort(code)

    def _exchange(self, outgoing, incoming: np.ndarray, tag: int, what: str) -> None:
        """Swap one message with every other rank, watched by the deadline: we send rank j
        `outgoing(j)`, and incoming[j] receives what rank j sends us (incoming[self.rank]
        our own `outgoing(self.rank)`)."""
        np.copyto(incoming[self.rank], outgoing(self.rank))
        peers = [j for j in range(self.size) if j != self.rank]
        receives = [self.comm.Irecv(incoming[j], source=j, tag=tag) for j in peers]
        sends = [self.comm.Isend(np.ascontiguousarray(outgoing(j)), dest=j, tag=tag)
                 for j in peers]
        self._wait(receives, sends, peers, what)

    def _wait(self, receives: list, sends: list, peers: list[int], what: str) -> None:
        """Poll the requests until all are done (MPICH's own blocking wait polls too), or
        the deadline passes: then name the ranks whose message has not come (or, if every
        message came, those that have not taken ours)."""
        limit = self.deadline.seconds()
        ends = time.monotonic() + limit
        waiting = list(zip(peers, receives)) + list(zip(peers, sends))
        while waiting:
            waiting = [(peer, request) for peer, request in waiting if not request.Test()]
            if waiting and time.monotonic() > ends:
                raise silence(what, {peer for peer, _ in waiting}, limit)
            time.sleep(0)  # let the prefetching thread have the interpreter

    def native(self) -> NativeMpi:
        """What code of our own needs to exchange messages on this world's communicator."""
        if self._native is None:
            self._native = NativeMpi.of(self.comm)
        return self._native

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
