"""The link between a program's exchange kernels and the ranks of the job it runs in: the
words `llvm/exchange.py` reads, filled from the world before each run, and the error after a
run whose exchange failed.

One process (`Solo`) links one rank: the kernels combine their own rows and call nothing. An
MPI world adds its communicator, the transport compiled for its library's handle sizes, the
exchange deadline in cycles (read again before each run: it follows the median step), and
room for the requests.
"""

from __future__ import annotations

import numpy as np

from ...distributed.world import MpiWorld, current, silence
from ...errors import ResourceError
from .llvm import exchange, jit, measure
from .llvm.exchange import (BYTE, COMM, DEADLINE, ERROR, FAILED, GATHER, IRECV, ISEND,
                            LINK_HEADER, RANK, RANKS, TAG, TEST, TRANSPORT)

TAG_VALUE = 104  # beside MpiWorld's own tags: exchanges from the driver are a stream of their own
WHAT = "batch-norm statistics"


class RankLink:
    """The link of one program: `widest` is the most channels an exchange sends, each of
    `itemsize` bytes."""

    def __init__(self, target, cache_dir, widest: int, itemsize: int):
        self.target, self.cache_dir = target, cache_dir
        self.row_bytes = 2 * widest * itemsize
        self.world = None
        self.cycles = 0.0  # of the counter the deadline is in
        self.words = np.zeros(LINK_HEADER, np.int64)
        self.rows = np.zeros(0)

    def bind(self) -> np.ndarray:
        """The link to `current()`'s ranks."""
        world = current()
        if world is not self.world:
            self._join(world)
        self.words[FAILED] = self.words[ERROR] = 0
        if world.size > 1:
            self.words[DEADLINE] = int(world.deadline.seconds() * self.cycles)
        return self.words

    def _join(self, world) -> None:
        self.world = world
        self.rows = np.zeros(world.size * self.row_bytes, np.uint8)
        if world.size == 1:
            self.words = np.zeros(LINK_HEADER, np.int64)
        elif isinstance(world, MpiWorld):
            self.words = self._mpi_words(world)
        else:
            raise ResourceError(f"the cpu backend exchanges statistics over MPI; a world of "
                                f"{type(world).__name__} has no communicator to call")
        self.words[RANKS], self.words[RANK] = world.size, world.rank
        self.words[GATHER] = self.rows.ctypes.data

    def _mpi_words(self, world: MpiWorld) -> np.ndarray:
        mpi = world.native()
        transport = exchange.Transport(self.target, mpi.handle_bytes, mpi.request_bytes,
                                       mpi.status_bytes)
        size = (LINK_HEADER + 2 * world.size + exchange.words(mpi.status_bytes)
                + 2 * world.size * exchange.words(mpi.request_bytes))
        words = np.zeros(size, np.int64)
        words[TRANSPORT] = jit.address(transport, self.cache_dir)
        words[COMM], words[BYTE], words[TAG] = _word(mpi.comm), _word(mpi.byte), TAG_VALUE
        words[ISEND], words[IRECV], words[TEST] = mpi.isend, mpi.irecv, mpi.test
        self.cycles = measure.cycles_per_second(self.target, self.cache_dir)
        return words

    def check(self) -> None:
        """After a run: the failure of one of its exchanges, if any, as the world says it."""
        if not self.words[FAILED]:
            return
        world = self.world
        if self.words[ERROR]:
            raise ResourceError(f"exchanging {WHAT}: MPI error {int(self.words[ERROR])} on "
                                f"rank {world.rank}")
        done = self.words[LINK_HEADER:LINK_HEADER + 2 * world.size].reshape(2, world.size)
        silent = {rank for rank in range(world.size) if not done[:, rank].all()}
        raise silence(WHAT, silent, world.deadline.seconds())


def _word(handle: int) -> int:
    """A handle (an int or a pointer of the library's) as the int64 word it is passed in."""
    return int(np.uint64(handle & (2 ** 64 - 1)).view(np.int64))
