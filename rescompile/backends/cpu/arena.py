"""An arena: the buffers and driver tables of one schedule at one batch size and thread count
(the most its calls run on: `threads.py`).

Where values live (what `rescompile dump --memory` reports):
- batch buffers: values in `schedule.batch_values` (fetched, or read by a later segment), for
  every image of the batch;
- per-thread buffers: every other value the depth-first segments compute, for the images of
  one call (a segment's `images`), one region per thread;
- kernel scratch: one region per thread, as large as the most any step uses (`Step.scratch`:
  a Winograd convolution's transformed tiles), never holding a value between calls;
- shared buffers: every value but the depth-first schedule's fetched ones, for the images that
  run shared (in training: the whole batch), with the float64 slot buffers of reductions and
  the tensors of no batch dimension (weight gradients, batch statistics);
- fed values, variables and host steps' outputs: their own arrays, rebound when a different
  array comes in;
- packed weights: the program's, repacked when a weight array changes.

Per-thread and shared regions reuse memory by liveness (`memory.assign_buffers`), a
zero-bordered or dilated value only with values of the same layout, so the zeros, made when the
region is allocated, stay zero: kernels write only interiors (and a dilated buffer only its
samples).

Every tensor has the same layout wherever it lives: images of (H + top + bottom) rows of
(W + left + right) pixels of C channels, so the strides in a step's constants do not depend on
the placement, and the depth-first and shared tables share their constants. Each tensor's
bytes are those of the type it is stored in (`program.types`: a bfloat16 model's activations
take 2 bytes an element, its statistics and weight gradients 4).
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import numpy as np

from ...memory import assign_buffers, lifetimes
from ...precision import numpy_dtype
from ...resources import check_fits
from . import driver, pool
from .kernel_steps import pixel_split
from .llvm import abi, sync
from .steps import Step
from .target import DTYPE_BYTES
from .threads import ThreadCount
from .tuning import CHUNK_FLOPS, CHUNKS_PER_THREAD, streams

ALIGN = 64  # bytes: every buffer starts on a cache line (the packed weights need 32)


def shared_chunks(flops: float, threads: int) -> int:
    low, high = CHUNKS_PER_THREAD
    return int(min(max(flops / CHUNK_FLOPS, low * threads), high * threads))


def aligned_empty(nbytes: int, zero: bool = True) -> np.ndarray:
    """A byte array whose data starts on a cache line."""
    raw = (np.zeros if zero else np.empty)(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


@dataclass(frozen=True)
class Layout:
    """Strides (elements) of one image, and where its data starts inside its zero border."""
    h: int
    w: int
    c: int
    pads: tuple[int, int, int, int]

    @property
    def row(self) -> int:
        return (self.w + self.pads[2] + self.pads[3]) * self.c

    @property
    def image(self) -> int:
        return (self.h + self.pads[0] + self.pads[1]) * self.row

    @property
    def data(self) -> int:
        return self.pads[0] * self.row + self.pads[2] * self.c

    def window(self, top: int, left: int) -> int:
        return self.data - top * self.row - left * self.c


@dataclass
class Region:
    """Values packed into one allocation by liveness: value -> byte offset."""
    offsets: dict[str, int]
    nbytes: int


def plan_region(steps, sizes: dict[str, int], kinds: dict, keep=None) -> Region:
    lifetime = lifetimes(steps, set())
    for value, last in (keep or {}).items():
        if value in lifetime:
            lifetime[value] = (lifetime[value][0], max(lifetime[value][1], last))
    lifetime = {v: span for v, span in lifetime.items() if v in sizes}
    assign, buffers = assign_buffers(sizes, lifetime, kinds)
    starts, total = [], 0
    for size in buffers:
        starts.append(total)
        total += -(-size // ALIGN) * ALIGN
    return Region({v: starts[b] for v, b in assign.items()}, total)


class Arena:
    """`shared_only` runs every image shared (training; and for checking each step's outputs
    before the next step overwrites them)."""

    def __init__(self, program, schedule, batch: int, threads: int, shared_only: bool = False):
        self.program, self.schedule = program, schedule
        self.batch, self.threads = batch, threads
        self.n_shared = batch if shared_only else batch % threads
        self.n_items = batch - self.n_shared
        self.layouts = {v: Layout(*shape, schedule.pads.get(v, (0, 0, 0, 0)))
                        for v, shape in schedule.shapes.items()}
        self.image_bytes = {v: lay.image * self.itemsize(v) for v, lay in self.layouts.items()}
        internal = schedule.internal
        self.internal = set(internal)
        kinds = {v: (self.layouts[v], v in schedule.dilated)
                 if v in self.layouts and (any(self.layouts[v].pads) or v in schedule.dilated)
                 else None for v in internal}
        whole = {v: self.image_bytes[v] * batch for v in internal if v in schedule.batch_values}
        per_call = {}
        for seg in schedule.segments:
            for step in schedule.steps[seg.begin:seg.end]:
                for v in step.outputs:
                    if v not in whole:
                        per_call[v] = self.image_bytes[v] * seg.images
        self.thread_region = plan_region(schedule.steps, per_call, kinds)
        shared = {v: self.shared_bytes(v) for v in internal
                  if not (v in schedule.fetches and v in whole)}
        self.shared_region = plan_region(schedule.steps, shared, kinds, schedule.keep) \
            if self.n_shared else Region({}, 0)
        most = max((step.scratch for step in schedule.kernel_steps), default=0)
        self.scratch_bytes = -(-most // ALIGN) * ALIGN  # a thread's kernel scratch
        check_fits(sum(whole.values()) + (self.thread_region.nbytes + self.scratch_bytes)
                   * threads + self.shared_region.nbytes,
                   f"the cpu backend's buffers for batch {batch}")
        self.kernel_scratch = aligned_empty(self.scratch_bytes * threads, zero=False)
        self.batch_buffers = {v: aligned_empty(nbytes) for v, nbytes in whole.items()}
        self.thread_memory = aligned_empty(self.thread_region.nbytes * threads)
        self.shared_memory = aligned_empty(self.shared_region.nbytes)
        self.thread_counts = {}  # (begin, end) of the steps a call runs -> its ThreadCount
        self._tables()

    def itemsize(self, value: str) -> int:
        """Bytes per element of the type `value` is stored in."""
        return DTYPE_BYTES[self.program.types.of(value)]

    def shared_bytes(self, value: str) -> int:
        schedule = self.schedule
        if value in schedule.slots:
            return schedule.slots[value].count(self.n_shared) * schedule.slots[value].slot_bytes
        if value in schedule.flat:
            return schedule.flat[value] * self.itemsize(value)
        return self.image_bytes[value] * self.n_shared

    # -- tables ---------------------------------------------------------------------------
    def _tables(self) -> None:
        schedule = self.schedule
        n = len(schedule.steps)
        consts, offsets, total = [], [], 0
        for step in schedule.steps:
            offsets.append(total)
            consts.append(self._consts(step) if isinstance(step, Step)
                          else np.zeros(0, np.int64))
            total += len(consts[-1])
        self.consts = np.concatenate(consts) if consts else np.zeros(0, np.int64)
        self.steps = np.zeros((2 * n, driver.STEP_COLUMNS), np.int64)
        rows, row_steps, self.fed_rows = [], [], []
        for copy, placement in enumerate(("depth_first", "shared")):
            for i, step in enumerate(schedule.steps):
                row = self.steps[copy * n + i]
                row[driver.CONSTS] = offsets[i]
                row[driver.OPS_BEGIN] = row[driver.OPS_END] = len(rows)
                if not isinstance(step, Step):
                    continue  # a host step: the program runs it, never the driver
                row[driver.FN] = self.program.address(step.kernel)
                for pointer in step.kernel.signature.pointers:
                    rows.append(self._operand(step, pointer.role, placement, len(rows)))
                    row_steps.append(copy * n + i)
                row[driver.OPS_END] = len(rows)
                self._shape_row(row, step)
        self.operands = np.array(rows, np.int64).reshape(-1, 3)
        self.segments = np.array([[s.begin, s.end, s.images] for s in schedule.segments],
                                 np.int64).reshape(-1, 3)
        self.shared_steps = (n, 2 * n)
        rows_of: dict[tuple, list] = {}
        for row, key, offset in self.fed_rows:
            rows_of.setdefault(key, []).append((row, offset))
        self.bound_keys = list(rows_of)
        self.bound_names = [value for _, value, _ in self.bound_keys]
        self.bound_rows = list(rows_of.values())
        self.bound_steps = [{row_steps[row] for row, _ in key_rows}
                            for key_rows in self.bound_rows]
        self.bound = [None] * len(self.bound_keys)  # the arrays the operand rows point at now
        self.bindings: dict = {}  # (begin, end) of the steps a call runs -> its keys, names
        self.scratch = np.zeros((self.threads, driver.POINTER_BLOCK), np.int64)
        self.barrier_state = np.zeros(sync.STATE_WORDS, np.int64)
        counters = len(schedule.segments) + n
        self.counters = np.zeros(counters * driver.COUNTER_STRIDE, np.int64)

    def _split(self, step: Step) -> str:
        """How the shared copy of `step` is cut: as lowered, but by pixels where its channels
        make fewer panels than there are threads (ResNet-164's 3 x 3 layers of 32 and 64
        channels, one panel each, ran at batch 1 on one thread while the other waited)."""
        panels = -(-step.channels // step.channel_align)
        if step.split == "channels" and panels < self.threads and not step.fixed_chunk \
                and pixel_split(step.pixels) == "pixels":
            return "pixels"
        return step.split

    def _shape_row(self, row, step: Step) -> None:
        row[driver.PIXELS], row[driver.CHANNELS] = step.pixels, step.channels
        row[driver.PIXEL_ALIGN], row[driver.CHANNEL_ALIGN] = step.pixel_align, step.channel_align
        row[driver.SPLIT] = {"pixels": driver.SPLIT_PIXELS, "channels": driver.SPLIT_CHANNELS,
                             "both": driver.SPLIT_BOTH}[self._split(step)]
        row[driver.CHUNKS] = (step.groups if step.split == "both" else
                              shared_chunks(step.flops * self.n_shared, self.threads))
        row[driver.BATCHED] = int(step.batched)
        row[driver.FIXED] = step.fixed_chunk

    def _consts(self, step: Step) -> np.ndarray:
        """The step's fields in its kernel's order: sizes and scalars as the step gives them
        (a callable of the batch), strides from where its tensors live; a scalar as the bits of
        a float64."""
        values = {name: value(self.n_shared) if callable(value) else value
                  for name, value in step.fields.items()}
        values.update(abi.placed_values(step.kernel.signature,
                                        streaming=lambda: self.streams(step)))
        for role, value in step.tensors.items():
            layout, scale = self.layouts[value], step.stride_scale.get(role, 1)
            values.update({f"{role}.image": layout.image, f"{role}.row": layout.row * scale,
                           f"{role}.pixel": layout.c * scale})
        return np.array([np.float64(values[f.name]).view(np.int64) if f.kind == "scalar"
                         else int(values[f.name]) for f in step.kernel.signature.fields],
                        np.int64)

    def streams(self, step: Step) -> bool:
        """Whether `step` stores past the caches (`tuning.streams`): only in a shared
        schedule (training), whose outputs the backward pass reads again; inference's
        next layer reads a step's outputs at once, from the cache."""
        return not self.schedule.segments and streams(self.pixel_bytes(step), self.threads)

    def pixel_bytes(self, step: Step) -> int:
        """The bytes of the per-image tensors `step` reads and writes, over the images that
        run shared: what passes through the caches with the batch (weights and slots do not
        grow with it)."""
        values = {use.value for use in step.uses.values()
                  if use.how not in ("packed", "link", "scratch")}
        return sum(self.image_bytes[v] for v in values if v in self.image_bytes) * self.n_shared

    def _operand(self, step: Step, role: str, placement: str, row: int) -> list[int]:
        """[base, per thread, per image] of one pointer argument (bases of fed values and
        weights are bound at run time)."""
        use = step.uses[role]
        value = use.value
        if use.how == "scratch":
            return [self.kernel_scratch.ctypes.data, self.scratch_bytes, 0]
        if use.how == "packed":
            self.fed_rows.append((row, ("packed", value, use), 0))
            return [0, 0, 0]
        layout = self.layouts.get(value)
        offset = 0
        if layout is not None:
            offset = (layout.window(*use.pads) if use.how == "window" else layout.data) \
                * self.itemsize(value)
        schedule = self.schedule
        if value not in self.internal:
            per_image = self.image_bytes[value] if value in schedule.feeds else 0
            self.fed_rows.append((row, ("value", value, None), offset))
            return [0, 0, per_image]
        if value in self.batch_buffers and (placement == "depth_first"
                                            or value in schedule.fetches):
            return [self.batch_buffers[value].ctypes.data + offset, 0, self.image_bytes[value]]
        if placement == "depth_first":
            if value not in self.thread_region.offsets:
                return [0, 0, 0]  # a shared schedule: its depth-first rows never run
            base = self.thread_memory.ctypes.data + self.thread_region.offsets[value]
            return [base + offset, self.thread_region.nbytes, 0]
        if not self.n_shared:
            return [0, 0, 0]  # the shared steps do not run at this batch size
        return [self.shared_memory.ctypes.data + self.shared_region.offsets[value] + offset,
                0, 0]

    # -- running --------------------------------------------------------------------------
    def bind(self, arrays: dict, shared=None) -> None:
        """Point fed values, variables, host outputs and packed weights at the current
        arrays, for the rows of the steps a call runs (all, or the shared steps [begin, end)
        of `shared`, as `run`): only rows whose array is not the one bound last time change. A
        host step's output not computed yet is bound by a later call, before the steps that
        read it. A call looks only at the arrays its own steps read: an entry cut by host
        steps into many short calls does not walk every binding of the schedule each time."""
        keys, names = self._binding(self._steps_of(shared))
        current = list(map(arrays.get, names))
        if all(map(operator.is_, current, map(self.bound.__getitem__, keys))):
            return
        for k, array in zip(keys, current):
            if array is not None and array is not self.bound[k]:
                kind, value, use = self.bound_keys[k]
                data = self.program.packed(use, arrays) if kind == "packed" else array
                for row, offset in self.bound_rows[k]:
                    self.operands[row, driver.BASE] = data.ctypes.data + offset
                self.bound[k] = array

    def _steps_of(self, shared) -> tuple[int, int]:
        """Rows of `self.steps` a call runs: the whole schedule (both copies), or the shared
        copy's [begin, end)."""
        if shared is None:
            return 0, len(self.steps)
        begin = self.shared_steps[0]
        return begin + shared[0], begin + shared[1]

    def _binding(self, steps: tuple[int, int]) -> tuple[list, list]:
        if steps not in self.bindings:
            keys = [k for k, rows in enumerate(self.bound_steps)
                    if any(steps[0] <= row < steps[1] for row in rows)]
            self.bindings[steps] = keys, [self.bound_names[k] for k in keys]
        return self.bindings[steps]

    def run(self, profile: np.ndarray, shared=None) -> None:
        """Run the whole schedule, or only the shared steps [begin, end) of `shared`, on as
        many of the arena's threads as run it fastest now (`threads.py`); a profiled run on
        all of them, as its table reports."""
        begin, end = self.shared_steps if shared is None else self._steps_of(shared)
        count = self.thread_counts.setdefault((begin, end), ThreadCount(self.threads))
        threads = self.threads if profile.shape[0] else count.choose()
        self.counters[:] = 0
        cpu = pool.cpu_seconds(threads) if threads > 1 else None
        start = time.perf_counter()
        driver.run(self.steps, self.segments, self.operands, self.consts, self.scratch,
                   self.counters, self.n_items, self.n_shared, begin, end, threads,
                   self.program.barrier, self.barrier_state, profile)
        seconds = time.perf_counter() - start
        share = None if cpu is None else (pool.cpu_seconds(threads) - cpu) / (threads * seconds)
        count.record(threads, seconds, share)

    def view(self, value: str) -> np.ndarray:
        """The images of `value` in its batch or shared buffer, without their border (a
        tensor of no batch dimension in its graph shape)."""
        graph = self.program.graph
        if self._in_batch_buffer(value):
            raw, images = self.batch_buffers[value], self.batch
        else:
            start = self.shared_region.offsets[value]
            images = self.n_shared
            raw = self.shared_memory[start:start + self.shared_bytes(value)]
        if value in self.schedule.flat:
            shape = graph.value(value).shape
            return raw.view(self._kind(value))[:math.prod(shape)].reshape(shape)
        lay = self.layouts[value]
        top, bottom, left, right = lay.pads
        full = raw.view(self._kind(value)).reshape(images, lay.h + top + bottom,
                                                    lay.w + left + right, lay.c)
        return full[:, top:top + lay.h, left:left + lay.w, :]

    def _in_batch_buffer(self, value: str) -> bool:
        """Whether the kernels write `value`'s images to its batch buffer (`_operand`): a fetched
        value's always, another's only from depth-first items; an arena with none (one that
        runs every image shared, as `check_finite` does) writes them to the shared region."""
        return value in self.batch_buffers and (value in self.schedule.fetches
                                                or self.n_items > 0)

    def _kind(self, value: str) -> np.dtype:
        return numpy_dtype(self.program.types.of(value))

    def fetch(self, value: str, shape: tuple) -> np.ndarray:
        """A copy of `value` in the compute type (what the user gets: float32 of a bfloat16
        tensor)."""
        return np.array(self.view(value), self.program.types.compute).reshape(shape)

    @property
    def packed_bytes(self) -> int:
        """The program's packed weights for this schedule (packed at the first run)."""
        packed = {use: self.program.packed_bytes(use) for step in self.schedule.kernel_steps
                  for use in step.uses.values() if use.how == "packed"}
        return sum(packed.values())

    @property
    def allocated_bytes(self) -> int:
        return (sum(b.nbytes for b in self.batch_buffers.values()) + self.thread_memory.nbytes
                + self.kernel_scratch.nbytes + self.shared_memory.nbytes + self.packed_bytes)

    def summary(self) -> str:
        mib = 2.0 ** 20
        batch = sum(b.nbytes for b in self.batch_buffers.values())
        lines = [f"cpu arena, batch {self.batch} on {self.threads} threads "
                 f"({self.n_items} images depth first, {self.n_shared} shared)",
                 f"  batch buffers    {len(self.batch_buffers):>4} values "
                 f"{batch:>14,} bytes ({batch / mib:.1f} MiB)",
                 f"  per thread       {len(self.thread_region.offsets):>4} values "
                 f"{self.thread_region.nbytes:>14,} bytes x {self.threads} threads",
                 f"  kernel scratch        {self.scratch_bytes:>14,} bytes x {self.threads} "
                 f"threads",
                 f"  shared           {len(self.shared_region.offsets):>4} values "
                 f"{self.shared_region.nbytes:>14,} bytes",
                 f"  packed weights        {self.packed_bytes:>14,} bytes",
                 f"  allocated in all      {self.allocated_bytes:>14,} bytes "
                 f"({self.allocated_bytes / mib:.1f} MiB)"]
        return "\n".join(lines) + "\n"
