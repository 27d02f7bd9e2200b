"""Joining a job: the world of this process, its threads, and stopping every rank together."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

from ..errors import UserError, optional_module
from .world import Deadline, MpiWorld, Solo

# What the launchers set in every rank's environment: MPICH's Hydra (PMI), Open MPI, PMIx.
LAUNCHER_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def started_by_mpiexec() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def world_for(distributed: bool | None, exchange_timeout: float | None = None):
    """MPI's world when asked (`True`) or started under mpiexec (`None`), else `Solo`; its
    exchanges wait `exchange_timeout` seconds for the other ranks (default: `Deadline`'s)."""
    if distributed is False or (distributed is None and not started_by_mpiexec()):
        return Solo()
    MPI = optional_module("mpi4py.MPI", "distributed training", "mpi")
    world = MpiWorld(MPI.COMM_WORLD, Deadline(exchange_timeout))
    _share_cores(world)
    return world


def _share_cores(world) -> None:
    """Ranks on one machine split its cores, unless the user set NUMBA_NUM_THREADS."""
    if world.local_size == 1 or "NUMBA_NUM_THREADS" in os.environ:
        return
    import numba
    numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // world.local_size))


@contextlib.contextmanager
def failing_together(world):
    """On more than one rank, an error on any of them ends the job: the failing rank reports
    (one line for a user error, the traceback otherwise) and aborts every rank, instead of
    leaving the others waiting in a collective for ever."""
    try:
        yield
    except BaseException as exc:
        if world.size == 1 or isinstance(exc, SystemExit) and not exc.code:
            raise
        prefix = f"rescompile: rank {world.rank} of {world.size}:"
        if isinstance(exc, UserError):
            print(f"{prefix} {exc}", file=sys.stderr, flush=True)
        elif isinstance(exc, KeyboardInterrupt):
            print(f"{prefix} interrupted", file=sys.stderr, flush=True)
        else:
            print(f"{prefix} {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
        world.abort(getattr(exc, "exit_code", 1))
