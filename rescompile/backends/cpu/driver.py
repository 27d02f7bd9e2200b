"""The CPU backend's driver: one Numba function that runs a program of micro-kernel calls.

Design note
-----------
A program is tables of int64, which `arena.py` makes from a schedule (`schedule.py`) and the
buffers it allocates:

    steps[s]     = fn, consts, first operand, end operand, pixels per image, channels,
                   pixel alignment, channel alignment, split (0 pixels, 1 channels,
                   2 both), chunks (how many pieces the shared schedule cuts it into; for
                   "both", channel groups per chunk of pixels), batched (0: one pass over
                   its pixels whatever the batch), fixed (a reduction: its pixels are cut
                   into chunks of exactly this many, one call and one slot each)
    segments[g]  = first step, end step, images per work item
    operands[o]  = base address, bytes per thread, bytes per image

Calling step s on images [n0, n0 + g) by thread t resolves each operand to
`base + t * per_thread + n0 * per_image` (per-thread scratch moves with t, batch tensors with
n0, weights with neither), writes the addresses into the thread's own pointer block and calls
the kernel, `fn(consts, pointers, p_begin, p_end, c_begin, c_end)`, through its address.

Every thread of a run runs `_thread`: the calling thread, and the other threads of a `pool.py`
pool, which `serve` the runs the caller posts in a job table (on one thread, `run_alone` runs
it on the calling thread alone):
- depth first: images [0, n_items) go through each segment of the program in work items of the
  segment's `images`; a thread takes the next item from an atomic counter until none is left,
  so a core that runs slower (a shared machine) simply takes fewer. In inference an image
  depends on no other image: only a segment boundary needs a barrier (the next segment reads
  what every thread wrote);
- shared: the remaining n_shared < threads images (all of them at batch 1) run step by step,
  every step's pixels or channel panels cut into chunks (a few per thread, more for big layers:
  `arena.shared_chunks`), taken from the step's counter the same way, with a barrier after
  each step.

Which thread computes an item or a chunk never changes its arithmetic (a kernel's loops do not
depend on the range it is given), so results are the same bits however the work was shared.
Counters are words of `counters`, one cache line each, zeroed by the caller before each run.

The driver is shape-generic: every model, depth and batch runs this one compiled function
(plus the micro-kernels it calls), so nothing here is compiled per layer. The program tables
are arrays, so Numba's on-disk cache keeps the compiled driver valid across processes.

Threads: a pool has one job table, so every entry goes through `run`, which holds one
process-wide lock for the run: executables used from several threads take turns inside the
driver (each call uses every core anyway), and everything around it (input checks, host
steps, other backends) still runs concurrently. Uncontended, the lock costs about 0.1 us a
call. (Numba's own parallel region, which this replaced, cost 90-120 us a call back to back
and 200-300 us after an idle gap, its threads asleep between calls.)
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...kernel_cache import repairing_numba_cache
from .pool import (ARRAY_BARRIER_STATE, ARRAY_CONSTS, ARRAY_COUNTERS, ARRAY_OPERANDS,
                   ARRAY_PROFILE, ARRAY_SCRATCH, ARRAY_SEGMENTS, ARRAY_STEPS, ARRAY_WORDS,
                   JOB_ARRAYS, JOB_BARRIER, JOB_BEGIN, JOB_END, JOB_ITEMS, JOB_SHARED, JOB_START,
                   JOB_THREADS, job_table)
from .llvm.sync import (SLEEP_NS, SLEEP_NS_BETWEEN_CALLS, SPINS_BEFORE_SLEEP,
                        SPINS_BETWEEN_CALLS)

# steps columns
(FN, CONSTS, OPS_BEGIN, OPS_END, PIXELS, CHANNELS, PIXEL_ALIGN, CHANNEL_ALIGN, SPLIT,
 CHUNKS, BATCHED, FIXED) = range(12)
STEP_COLUMNS = 12
SPLIT_PIXELS, SPLIT_CHANNELS, SPLIT_BOTH = 0, 1, 2
# segments columns
SEG_BEGIN, SEG_END, SEG_IMAGES = range(3)
# operands columns
BASE, PER_THREAD, PER_IMAGE = range(3)
# profile columns: cycles in kernels, cycles waiting at barriers, calls
KERNEL_CYCLES, WAIT_CYCLES, CALLS = range(3)
POINTER_BLOCK = 64  # int64 words per thread's pointer block (a multiple of a cache line)
COUNTER_STRIDE = 8  # int64 words between counters: one cache line each

_I64 = ir.IntType(64)
_entry = threading.Lock()  # one thread at a time in the parallel region (see the design note)


@intrinsic
def _call_kernel(typingctx, fn, consts, pointers, p_begin, p_end, c_begin, c_end):
    sig = types.void(*([types.int64] * 7))

    def codegen(context, builder, signature, args):
        address, *rest = args
        fnty = ir.FunctionType(ir.VoidType(), [_I64.as_pointer(), _I64.as_pointer()]
                               + [_I64] * 4)
        callee = builder.inttoptr(address, fnty.as_pointer())
        builder.call(callee, [builder.inttoptr(rest[0], _I64.as_pointer()),
                              builder.inttoptr(rest[1], _I64.as_pointer())] + rest[2:])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _call_barrier(typingctx, fn, state, threads, spins, sleep_ns):
    sig = types.void(*([types.int64] * 5))

    def codegen(context, builder, signature, args):
        address, state_address, *rest = args
        fnty = ir.FunctionType(ir.VoidType(), [_I64.as_pointer(), _I64, _I64, _I64])
        callee = builder.inttoptr(address, fnty.as_pointer())
        builder.call(callee, [builder.inttoptr(state_address, _I64.as_pointer()), *rest])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _words(typingctx, address):
    """The int64 words at `address`, as a pointer carray can view."""
    sig = types.CPointer(types.int64)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], _I64.as_pointer())
    return sig, codegen


@intrinsic
def _fetch_add(typingctx, address, value):
    """Atomically add `value` to the int64 at `address`; the old value."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", pointer, args[1], "monotonic")
    return sig, codegen


@intrinsic
def _cycles(typingctx):
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def _address(typingctx, array):
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, _I64)
    return types.int64(array), codegen


@njit(cache=True, nogil=True, inline="always")
def _chunk(total, align, c, chunks):
    """Chunk c of `chunks` of range(total), cut at multiples of align."""
    units = (total + align - 1) // align
    begin = min(total, (c * units // chunks) * align)
    end = min(total, ((c + 1) * units // chunks) * align)
    return begin, end


@njit(cache=True, nogil=True, inline="always")
def _resolve(operands, begin, end, t, n0, pointers):
    for o in range(begin, end):
        pointers[o - begin] = (operands[o, BASE] + t * operands[o, PER_THREAD]
                               + n0 * operands[o, PER_IMAGE])


@njit(cache=True, nogil=True, inline="always")
def _run_step(steps, s, operands, consts_at, pointers, t, n0, p_begin, p_end, c_begin, c_end,
              profile):
    _resolve(operands, steps[s, OPS_BEGIN], steps[s, OPS_END], t, n0, pointers)
    if profile.shape[0] > 0:
        start = _cycles()
    _call_kernel(steps[s, FN], consts_at + 8 * steps[s, CONSTS], _address(pointers),
                 p_begin, p_end, c_begin, c_end)
    if profile.shape[0] > 0:
        profile[t, s, KERNEL_CYCLES] += _cycles() - start
        profile[t, s, CALLS] += 1


@njit(cache=True, nogil=True, inline="always")
def _wait(barrier, barrier_at, threads, t, s, profile):
    if profile.shape[0] > 0:
        start = _cycles()
    _call_barrier(barrier, barrier_at, threads, SPINS_BEFORE_SLEEP, SLEEP_NS)
    if profile.shape[0] > 0:
        profile[t, s, WAIT_CYCLES] += _cycles() - start


@njit(cache=True, nogil=True)
def serve(job, t):
    """Pool thread t's life: wait at the job table's start barrier for a run (spinning long
    first: calls come back to back), run its part, again."""
    while True:
        _start(job)
        _part(job, t)


@njit(cache=True, nogil=True)
def lead(job):
    """The calling thread's part of a run posted in `job`: release the pool, run thread 0."""
    _start(job)
    _part(job, 0)


@njit(cache=True, nogil=True, inline="always")
def _start(job):
    _call_barrier(job[JOB_BARRIER], _address(job) + 8 * JOB_START, job[JOB_THREADS],
                  SPINS_BETWEEN_CALLS, SLEEP_NS_BETWEEN_CALLS)


@njit(cache=True, nogil=True, inline="always")
def _part(job, t):
    """Thread t's part of the run in `job`, then a barrier: no thread leaves a run (the
    caller least of all) before every thread is done with it."""
    threads, barrier = job[JOB_THREADS], job[JOB_BARRIER]
    state = _array(job, ARRAY_BARRIER_STATE)
    _thread(_array2(job, ARRAY_STEPS), _array2(job, ARRAY_SEGMENTS),
            _array2(job, ARRAY_OPERANDS), _array(job, ARRAY_CONSTS), _array2(job, ARRAY_SCRATCH),
            _array(job, ARRAY_COUNTERS), job[JOB_ITEMS], job[JOB_SHARED], job[JOB_BEGIN],
            job[JOB_END], threads, barrier, state, _array3(job, ARRAY_PROFILE), t)
    _call_barrier(barrier, _address(state), threads, SPINS_BEFORE_SLEEP, SLEEP_NS)


@njit(cache=True, nogil=True, inline="always")
def _array(job, i):
    at = JOB_ARRAYS + ARRAY_WORDS * i
    return carray(_words(job[at]), (job[at + 1],))


@njit(cache=True, nogil=True, inline="always")
def _array2(job, i):
    at = JOB_ARRAYS + ARRAY_WORDS * i
    return carray(_words(job[at]), (job[at + 1], job[at + 2]))


@njit(cache=True, nogil=True, inline="always")
def _array3(job, i):
    at = JOB_ARRAYS + ARRAY_WORDS * i
    return carray(_words(job[at]), (job[at + 1], job[at + 2], job[at + 3]))


@njit(cache=True, nogil=True)
def run_alone(steps, segments, operands, consts, scratch, counters, n_items, n_shared,
              shared_begin, shared_end, threads, barrier, barrier_state, profile):
    """A run on one thread, the caller's, with no pool: a pool thread may run on another
    core than the one whose caches hold what the host steps between runs just wrote
    (measured when a synchronised train step still ran as hundreds of runs: 1,311 ms a step
    at batch 64 through a parallel region of one thread, 1,114 ms on the calling thread)."""
    _thread(steps, segments, operands, consts, scratch, counters, n_items, n_shared,
            shared_begin, shared_end, 1, barrier, barrier_state, profile, 0)


@njit(cache=True, nogil=True, inline="always")
def _thread(steps, segments, operands, consts, scratch, counters, n_items, n_shared,
            shared_begin, shared_end, threads, barrier, barrier_state, profile, t):
    """Thread t's part of a run: work items and chunks taken from the counters."""
    consts_at = _address(consts)
    barrier_at = _address(barrier_state)
    counters_at = _address(counters)
    pointers = scratch[t]
    for g in range(segments.shape[0]):
        group = segments[g, SEG_IMAGES]
        items = (n_items + group - 1) // group
        counter = counters_at + 8 * COUNTER_STRIDE * g
        item = _fetch_add(counter, 1)
        while item < items:
            n0 = item * group
            count = min(group, n_items - n0)
            for s in range(segments[g, SEG_BEGIN], segments[g, SEG_END]):
                _run_step(steps, s, operands, consts_at, pointers, t, n0, 0,
                          count * steps[s, PIXELS], 0, steps[s, CHANNELS], profile)
            item = _fetch_add(counter, 1)
        if g + 1 < segments.shape[0]:
            _wait(barrier, barrier_at, threads, t, segments[g, SEG_END] - 1, profile)
    if n_shared == 0:
        return
    for s in range(shared_begin, shared_end):
        counter = counters_at + 8 * COUNTER_STRIDE * (segments.shape[0] + s - shared_begin)
        pixels = (n_shared if steps[s, BATCHED] else 1) * steps[s, PIXELS]
        pieces, groups = _pieces(steps, s, pixels)
        c = _fetch_add(counter, 1)
        while c < pieces:
            p_begin, p_end, c_begin, c_end = _piece(steps, s, pixels, c, pieces, groups)
            if p_begin < p_end and c_begin < c_end:
                _run_step(steps, s, operands, consts_at, pointers, t, n_items, p_begin,
                          p_end, c_begin, c_end, profile)
            c = _fetch_add(counter, 1)
        _wait(barrier, barrier_at, threads, t, s, profile)


@njit(cache=True, nogil=True, inline="always")
def _pieces(steps, s, pixels):
    """How many pieces shared step s is cut into, and its channel groups (split "both")."""
    fixed = steps[s, FIXED]
    if steps[s, SPLIT] == SPLIT_BOTH:
        return (pixels + fixed - 1) // fixed * steps[s, CHUNKS], steps[s, CHUNKS]
    if steps[s, SPLIT] == SPLIT_PIXELS:
        if fixed > 0:
            return (pixels + fixed - 1) // fixed, 1
        units = (pixels + steps[s, PIXEL_ALIGN] - 1) // steps[s, PIXEL_ALIGN]
        return min(units, steps[s, CHUNKS]), 1
    units = (steps[s, CHANNELS] + steps[s, CHANNEL_ALIGN] - 1) // steps[s, CHANNEL_ALIGN]
    return min(units, steps[s, CHUNKS]), 1


@njit(cache=True, nogil=True, inline="always")
def _piece(steps, s, pixels, c, pieces, groups):
    """(p_begin, p_end, c_begin, c_end) of piece c."""
    channels = steps[s, CHANNELS]
    if steps[s, SPLIT] == SPLIT_BOTH:
        fixed = steps[s, FIXED]
        p_begin = (c // groups) * fixed
        c_begin, c_end = _chunk(channels, steps[s, CHANNEL_ALIGN], c % groups, groups)
        return p_begin, min(pixels, p_begin + fixed), c_begin, c_end
    if steps[s, SPLIT] == SPLIT_PIXELS:
        align = steps[s, FIXED] if steps[s, FIXED] > 0 else steps[s, PIXEL_ALIGN]
        p_begin, p_end = _chunk(pixels, align, c, pieces)
        return p_begin, p_end, 0, channels
    c_begin, c_end = _chunk(channels, steps[s, CHANNEL_ALIGN], c, pieces)
    return 0, pixels, c_begin, c_end


def run(steps, segments, operands, consts, scratch, counters, n_items, n_shared,
        shared_begin, shared_end, threads, barrier, barrier_state, profile) -> None:
    """A run on `threads` threads: the caller's and a pool's (`pool.py`), or `run_alone`
    on one; one thread of the process at a time."""
    with _entry:
        if threads == 1:
            run_alone(steps, segments, operands, consts, scratch, counters, n_items,
                      n_shared, shared_begin, shared_end, 1, barrier, barrier_state, profile)
            return
        job = job_table(threads, barrier, serve)
        job[[JOB_ITEMS, JOB_SHARED, JOB_BEGIN, JOB_END]] = (n_items, n_shared, shared_begin,
                                                            shared_end)
        arrays = {ARRAY_STEPS: steps, ARRAY_SEGMENTS: segments, ARRAY_OPERANDS: operands,
                  ARRAY_CONSTS: consts, ARRAY_SCRATCH: scratch, ARRAY_COUNTERS: counters,
                  ARRAY_BARRIER_STATE: barrier_state, ARRAY_PROFILE: profile}
        for i, array in arrays.items():
            at = JOB_ARRAYS + ARRAY_WORDS * i
            job[at] = array.ctypes.data
            job[at + 1:at + 1 + array.ndim] = array.shape
        lead(job)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the driver now, with an empty program; a cache
    entry Numba cannot read is emptied and the driver compiled again."""
    steps = np.zeros((0, STEP_COLUMNS), np.int64)
    empty = (steps, np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64), np.zeros(1, np.int64),
             np.zeros((1, POINTER_BLOCK), np.int64), np.zeros(COUNTER_STRIDE, np.int64),
             0, 0, 0, 0, 1, 0, np.zeros(16, np.int64), empty_profile())
    repairing_numba_cache(compiled_functions(), lambda: (run_alone(*empty), _compile_pool()))


def empty_profile() -> np.ndarray:
    return np.zeros((0, 0, 3), np.int64)


def threads() -> int:
    return numba.get_num_threads()


def compiled_functions() -> list:
    """The Numba dispatchers this module compiles (for the tests that pin their number)."""
    return [_chunk, _resolve, _run_step, _wait, _pieces, _piece, _thread, _start, _part,
            _array, _array2, _array3, serve, lead, run_alone]


def _compile_pool() -> None:
    """Compile (or load) the pool's functions without running them: `serve` never returns."""
    job = types.Array(types.int64, 1, "C")
    serve.compile((job, types.int64))
    lead.compile((job,))
