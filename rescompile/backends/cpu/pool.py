"""The threads that run the driver's calls beside the calling thread.

Design note
-----------
A run on T threads is the calling thread and T - 1 threads of a pool, made once per process
and thread count. Each pool thread lives in the driver's `serve`: it waits at a barrier in
the pool's job table, runs its part of the run the caller wrote there (the arrays' addresses
and sizes, the run's scalars: `driver.run`), and meets the others at the run's end. The
caller joins that barrier to start a run, so a run costs no thread a wake-up while calls come
back to back: a waiting pool thread spins about 1.5 ms before it sleeps
(`sync.SPINS_BETWEEN_CALLS`), the time a caller takes between calls, and is woken by the
caller only after that. Numba's parallel region, which this replaced, put its threads to
sleep after each call and woke them with the next, 90-120 us a call back to back and 200-300
us after an idle gap on a VM whose idle vCPUs halt (Zen 5, 2 cores); ResNet-18 at batch 1
ran 10-35% slower alone in a process than beside another framework's spinning thread pool.

The pool threads are daemons: they hold no Python state and sleep between bursts of calls.
A forked child has none of its parent's threads, so it starts its own pools. What CPU time a
run's threads got (`cpu_seconds`) tells the thread count whether a core was taken from them
(`threads.py`).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

# The job table's words: the run's scalars, then each array's address and 3 sizes, then the
# state of the barrier at which the pool's threads wait for a run, whose words (8 apart)
# never share a cache line.
(JOB_THREADS, JOB_BARRIER, JOB_ITEMS, JOB_SHARED, JOB_BEGIN, JOB_END) = range(6)
JOB_ARRAYS = 8
ARRAY_WORDS = 4
# the arrays, in their order in the table
(ARRAY_STEPS, ARRAY_SEGMENTS, ARRAY_OPERANDS, ARRAY_CONSTS, ARRAY_SCRATCH, ARRAY_COUNTERS,
 ARRAY_BARRIER_STATE, ARRAY_PROFILE) = range(8)
JOB_START = 40
JOB_WORDS = 64

# thread count -> that pool's job table and threads
_pools: dict[int, tuple[np.ndarray, list[threading.Thread]]] = {}


def job_table(threads: int, barrier: int, serve) -> np.ndarray:
    """The job table of the pool for runs on `threads` threads, whose threads meet at
    `barrier` (a barrier kernel's address: kept for the process) and run `serve(job, t)`
    (the driver's), started at the first run."""
    if threads not in _pools:
        job = np.zeros(JOB_WORDS, np.int64)
        job[JOB_THREADS], job[JOB_BARRIER] = threads, barrier
        workers = [threading.Thread(target=serve, args=(job, t), name=f"rescompile-{t}",
                                    daemon=True) for t in range(1, threads)]
        for worker in workers:
            worker.start()
        _pools[threads] = job, workers
    return _pools[threads][0]


def cpu_seconds(threads: int) -> float | None:
    """The CPU time of the calling thread and the threads of the pool for runs on `threads`
    (None before that pool's first run)."""
    if threads not in _pools:
        return None
    _, workers = _pools[threads]
    return time.thread_time() + sum(time.clock_gettime(time.pthread_getcpuclockid(w.ident))
                                    for w in workers)


os.register_at_fork(after_in_child=_pools.clear)
