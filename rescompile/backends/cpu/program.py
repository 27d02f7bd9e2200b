"""The CPU program: the schedules' micro-kernels, compiled once, run by the driver.

Inference: `prepare` (parameter-only nodes: folded BN weights) runs once per variable load with
the ops' float64 definitions, which is what those nodes are: constants of the loaded weights;
`forward` runs the depth-first schedule in one call of the driver.

Training: `forward` and `backward` are the two halves of one shared schedule (so the backward
pass reads what the forward pass left in the same arena), `loss_and_grads` and `train_step`
have schedules of their own. An entry runs as phases: runs of kernel steps, each one call of
the driver, and host steps between them (the ops' NumPy definitions on small tensors).

Conv weights are packed into the panels the micro-kernel reads (rotated and transposed for a
data gradient, converted to the type the kernels read them in) once per weight array. Nothing
is compiled per layer: the kernels are the distinct micro-kernels the schedules use, the driver
is one Numba function for all.

Types (`steps.TensorTypes`, the precision policy for this graph): a tensor is stored in its
type in the arena; what comes in (the images, a host step's output) is converted to it once
per array, and what goes out (fetched values, a host step's inputs) to the compute type, so
the user and the host steps see float32 of a bfloat16 model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from ...entries import batch_of, kept_values
from ...interpret import interpret
from ...ops.registry import kind_of
from ...precision import Precision, to_storage
from . import driver
from .arena import Arena
from .autotune import Tuner, tuning_enabled
from .link import RankLink
from .llvm import jit, measure, sync
from .llvm.exchange import LINK_VALUE
from .steps import EXCHANGE_KINDS, HostStep, Step, TensorTypes
from .schedule import build_schedule, build_shared_schedule
from .target import DTYPE_BYTES, target_for
from .traffic import step_bytes
from .weights import pack_weights, packed_elements, transformed


# Entries with a schedule of their own; forward and backward share one.
OWN_SCHEDULES = ("loss_and_grads", "train_step", "step_gradients", "apply_gradients")


@dataclass
class Plan:
    """An entry's part of a schedule: steps [begin, end)."""
    schedule: object
    begin: int
    end: int


class CpuProgram:
    name = "cpu"

    def __init__(self, graph, entries, dtype: str, cache_dir=None, check_finite: bool = False,
                 isa: str | None = None, progress: bool = False, tune: bool | None = None,
                 retune: bool = False, generate_only: bool = False):
        """`generate_only`: schedule and generate the kernels, load none (for `dump --kernels
        --isa` of an instruction set this host may not run)."""
        self.graph, self.entries, self.dtype = graph, entries, dtype
        self.types = TensorTypes(graph, Precision(dtype))
        self.check_finite = check_finite
        self.target = target_for(isa, runnable=not generate_only)
        self.cache_dir = cache_dir
        self.tuner = Tuner(self.target, dtype, cache_dir, tuning_enabled(tune) or retune,
                           lambda kernel: jit.address(kernel, cache_dir), fresh=retune)
        start = time.perf_counter()
        self._plans: dict[str, Plan] = {}
        # The entry a user runs most is scheduled now, the others at their first run; its
        # kernels are every kernel the others use.
        main = self.plan("train_step" if "train_step" in entries else "forward")
        kernels = list(dict.fromkeys(s.kernel for s in main.schedule.steps
                                     if isinstance(s, Step)))
        self.addresses: dict = {}  # kernel -> function address, in the order they were loaded
        if not generate_only:
            self._load(kernels, progress, start)
        self.compile_seconds = time.perf_counter() - start
        self.arenas: dict[tuple, Arena] = {}
        self.prepared: dict[str, np.ndarray] = {}
        self.host: dict = {}  # schedule -> its host steps' outputs of the last run
        self._packed: dict[object, tuple[np.ndarray, np.ndarray]] = {}
        self._stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._as_fed: set[str] = set()  # values stored in the compute type (`stored`)
        self.profile: np.ndarray | None = None  # per (thread, step): cycles, wait, calls
        self._last_batch: int | None = None
        self.link = _link(graph, self.target, cache_dir, self.types.compute)

    def _load(self, kernels: list, progress: bool, start: float) -> None:
        """Compile (or find in the cache) and load every kernel, the barrier and the driver."""
        missing = [k for k in kernels if not jit.cached(k, self.cache_dir)] if progress else []
        for i, kernel in enumerate(missing, start=1):
            _progress(f"compiling micro-kernel {i}/{len(missing)}: {kernel.symbol}", start)
            self.address(kernel)
        for kernel in kernels:
            self.address(kernel)
        self.barrier = jit.address(sync.Barrier(self.target), self.cache_dir)
        if progress:
            _progress("loading the driver (Numba compiles it once, then loads it from its "
                      "cache)", start)
        driver.warm_up()
        if progress:
            _progress(f"compiled: {len(kernels)} micro-kernels ({len(missing)} new) and "
                      f"the driver", start)

    @property
    def schedule(self):
        """The schedule of the forward entry."""
        return self.plan("forward").schedule

    @property
    def plans(self) -> dict[str, Plan]:
        """Every entry's plan (scheduling those not run yet)."""
        for name in self.entries:
            if name != "prepare":
                self.plan(name)
        return dict(self._plans)

    def plan(self, entry: str) -> Plan:
        if entry not in self._plans:
            self._plans.update(self._schedule(entry))
        return self._plans[entry]

    @property
    def kernels(self) -> list:
        """Every micro-kernel loaded so far (an entry scheduled later may add some)."""
        return list(self.addresses)

    def address(self, kernel) -> int:
        if kernel not in self.addresses:
            self.addresses[kernel] = jit.address(kernel, self.cache_dir)
        return self.addresses[kernel]

    def _schedule(self, name: str) -> dict[str, Plan]:
        """The plans that schedule for `name` makes: forward and backward share one."""
        graph, entries, target = self.graph, self.entries, self.target
        if "prepare" in entries:
            schedule = build_schedule(graph, entries["forward"], target, self.types,
                                      self.tuner)
            return {"forward": Plan(schedule, 0, len(schedule.steps))}
        if name in OWN_SCHEDULES:
            entry = entries[name]
            schedule = self._shared(list(entry.nodes), entry.feeds, entry.fetches,
                                    {name: entry})
            return {name: Plan(schedule, 0, len(schedule.steps))}
        plans = {}
        forward, backward = entries["forward"], entries.get("backward")
        nodes = list(forward.nodes) + (list(backward.nodes) if backward else [])
        paired = self._shared(nodes, forward.feeds + (backward.feeds if backward else ()),
                              forward.fetches + (backward.fetches if backward else ()),
                              {forward.name: forward, **({"backward": backward}
                                                         if backward else {})})
        boundary = next((i for i, s in enumerate(paired.steps)
                         if backward and s.origin in {n.name for n in backward.nodes}),
                        len(paired.steps))
        plans["forward"] = Plan(paired, 0, boundary)
        if backward:
            plans["backward"] = Plan(paired, boundary, len(paired.steps))
        return plans

    def _shared(self, nodes, feeds, fetches, entries):
        """A shared schedule whose entries' fetches survive to the entry's last step."""
        schedule = build_shared_schedule(self.graph, nodes, feeds, fetches, self.target,
                                         self.types, tuner=self.tuner)
        for entry in entries.values():
            names = {n.name for n in entry.nodes}
            last = max((i for i, s in enumerate(schedule.steps) if s.origin in names),
                       default=0)
            schedule.keep.update({v: last for v in kept_values(self.entries, entry)
                                  if v in self.graph.values and v not in entry.feeds})
        return schedule

    # -- kernels --------------------------------------------------------------------------
    def kernel_listing(self, node_filter: str | None = None, assembly: bool = False) -> str:
        """Each step's kernel call in schedule order, and each distinct kernel's IR (or its
        optimised assembly) once, after its first call."""
        seen, parts = set(), []
        for schedule in dict.fromkeys(p.schedule for p in self.plans.values()):
            for step in schedule.steps:
                if not isinstance(step, Step) or (node_filter and node_filter not in step.name):
                    continue
                args = ", ".join(f"{role}={use.value}" for role, use in step.uses.items())
                parts.append(f"# node {step.name}: {step.kernel.symbol}({args})")
                if step.kernel not in seen:
                    seen.add(step.kernel)
                    ir_text = step.kernel.ir()
                    parts.append(jit.assembly(ir_text, self.target) if assembly else ir_text)
        return "\n".join(parts) + "\n"

    def packed(self, use, arrays: dict) -> np.ndarray:
        """The weights `use` (a packed Use) points at, packed as it says, rounded to the weight
        type and held in the packed type (`TensorTypes.packed`); packed again only when the
        array changes."""
        source = arrays[use.value]
        have = self._packed.get(use)
        if have is None or have[0] is not source:
            out = have[1] if have is not None else None
            read = self.types.precision.round(source, self.types.weights)  # as multiplied
            self._packed[use] = (source, pack_weights(
                transformed(read, use.transform), use.nr, out, self.types.packed(use),
                use.layout))
        return self._packed[use][1]

    def packed_bytes(self, use) -> int:
        """The bytes of the weights `use` points at, packed."""
        return DTYPE_BYTES[self.types.packed(use)] * packed_elements(
            self.graph.value(use.value).shape, use.nr, use.layout, use.transform)

    def stored_all(self, arrays: dict) -> dict:
        """`stored` of each of `arrays`: a copy of them, in which those a mixed policy stores
        in another type are converted (a call feeds every variable, hundreds of them, and
        looks only at those not yet known to be stored as fed: 0.6 ms a call at ResNet-164,
        batch 1, when it asked each one's type)."""
        out = dict(arrays)
        if self.types.precision.mixed:
            for name in [name for name in out if name not in self._as_fed]:
                out[name] = self.stored(name, out[name])
        return out

    def stored(self, name: str, array):
        """A fed or host-made `array` of value `name` in the type the arena stores it in
        (converted once per array)."""
        kind = self.types.of(name)
        if kind == self.types.compute:
            self._as_fed.add(name)
            return array
        if not isinstance(array, np.ndarray):
            return array
        have = self._stored.get(name)
        if have is None or have[0] is not array:
            self._stored[name] = (array, to_storage(array, kind))
        return self._stored[name][1]

    # -- running --------------------------------------------------------------------------
    def run(self, entry_name: str, feeds: dict) -> dict:
        entry = self.entries[entry_name]
        if entry_name == "prepare":
            env = interpret(entry.nodes, dict(feeds))
            self.prepared = {name: np.ascontiguousarray(env[name]) for name in entry.fetches}
            return dict(self.prepared)
        plan = self.plan(entry_name)
        arrays = self.stored_all(feeds)
        arrays.update(self.prepared)
        batch = self._batch(entry, arrays)
        arena = self.arena(plan.schedule, batch)
        host = self.host.setdefault(plan.schedule, {})
        if plan.begin == 0:
            host.clear()
        arrays.update(self.stored_all(host))
        if self.link is not None:
            arrays[LINK_VALUE] = self.link.bind()
        if plan.schedule.segments:
            arena.bind(arrays)
            if self.check_finite:
                self._run_checked(arena, plan, arrays, host)
            else:
                arena.run(self._profile_table(arena))
        else:
            self._run_phases(arena, plan, arrays, host)
        return {name: self._fetch(arena, host, arrays, name, batch) for name in entry.fetches}

    def _batch(self, entry, arrays) -> int:
        batch = batch_of(self.graph, entry, arrays)
        if batch is not None:
            self._last_batch = batch
        if self._last_batch is None:
            raise RuntimeError(f"entry {entry.name!r} needs a forward pass first")
        return self._last_batch

    def arena(self, schedule, batch: int) -> Arena:
        key = (schedule, batch, driver.threads())
        if key not in self.arenas:
            shared_only = self.check_finite or not schedule.segments
            self.arenas[key] = Arena(self, schedule, batch, key[2], shared_only)
        return self.arenas[key]

    def _run_phases(self, arena: Arena, plan: Plan, arrays: dict, host: dict) -> None:
        """Runs of kernel steps through the driver, host steps between them."""
        steps, i = plan.schedule.steps, plan.begin
        while i < plan.end:
            if isinstance(steps[i], HostStep):
                self._host_step(arena, steps[i], arrays, host)
                i += 1
                continue
            j = i
            while j < plan.end and isinstance(steps[j], Step):
                j += 1
            arena.bind(arrays, shared=(i, j))
            if self.check_finite:
                for k in range(i, j):
                    arena.run(driver.empty_profile(), shared=(k, k + 1))
                    self._linked()
                    self._check(steps[k], {v: arena.view(v) for v in _checked(steps[k])})
            else:
                arena.run(self._profile_table(arena), shared=(i, j))
                self._linked()
            i = j

    def _linked(self) -> None:
        """Raise the failure of an exchange in the run just ended (the steps after it
        computed nothing worth keeping)."""
        if self.link is not None:
            self.link.check()

    def _host_step(self, arena: Arena, step: HostStep, arrays: dict, host: dict) -> None:
        env, views = {}, []
        for name in step.inputs:
            if name in host or name in arrays:
                env[name] = host[name] if name in host else self._computed(arrays[name])
            else:
                views.append(arena.view(name).reshape(
                    self.graph.value(name).concrete_shape(arena.batch)))
                env[name] = views[-1].astype(self.types.compute, copy=False)
        interpret([step.node], env)
        for name in step.outputs:
            value = np.asarray(env[name])
            # An output may be an input returned as it is (an op that is the identity on one
            # rank): a view of arena memory that a later kernel reuses, so it is copied out.
            if any(np.may_share_memory(value, view) for view in views):
                value = value.copy()
            host[name] = np.ascontiguousarray(value) if value.ndim else value
            arrays[name] = self.stored(name, host[name])
        if self.check_finite:
            self._check(step, {name: host[name] for name in step.outputs})

    def _fetch(self, arena: Arena, host: dict, arrays: dict, name: str, batch: int):
        if name in host:
            return host[name]
        if name in arena.internal:
            return arena.fetch(name, self.graph.value(name).concrete_shape(batch))
        return self._computed(arrays[name])

    def _computed(self, array):
        """An array as the compute type (a stored bfloat16 one widened)."""
        return array.astype(self.types.compute, copy=False) if isinstance(
            array, np.ndarray) else array

    def _profile_table(self, arena: Arena) -> np.ndarray:
        """The profile counters the driver adds to: a `profile` of another shape (none yet,
        or another thread count) starts again from zero."""
        if self.profile is None:
            return driver.empty_profile()
        rows = arena.steps.shape[0]
        if self.profile.shape[:2] != (arena.threads, rows):
            self.profile = np.zeros((arena.threads, rows, 3), np.int64)
        return self.profile

    def start_profile(self) -> None:
        self.profile = np.zeros((0, 0, 3), np.int64)

    def profile_rows(self, batch: int, calls: int = 1, entry: str | None = None) -> list[dict]:
        """The profile of `calls` runs at `batch` as rows per kernel step, slowest first:
        kernel milliseconds per run (thread time over the threads, about its share of the
        wall time), waits at barriers, the kernel's GFLOP/s per thread, and the bytes its
        tensors hold (`traffic.py`) with its FLOPs per byte."""
        hz = measure.cycles_per_second(self.target)
        table = self.profile
        schedule = self._profiled_schedule(entry)
        arena, steps = self.arena(schedule, batch), schedule.steps
        n = len(steps)
        kernel = (table[:, :n, 0] + table[:, n:, 0]).sum(axis=0) / hz
        wait = (table[:, :n, 1] + table[:, n:, 1]).sum(axis=0) / hz
        counted = (table[:, :n, 2] + table[:, n:, 2]).sum(axis=0)
        threads, total = table.shape[0], kernel.sum()
        rows = []
        for i, step in enumerate(steps):
            if not isinstance(step, Step):
                continue
            read, written = step_bytes(arena, step)
            rows.append({"name": step.name, "op": step.op, "kernel": step.kernel.symbol,
                         "calls": int(counted[i]) // calls,
                         "ms": 1e3 * kernel[i] / threads / calls,
                         "wait_ms": 1e3 * wait[i] / threads / calls,
                         "percent": 100 * kernel[i] / total if total else 0.0,
                         "gflops": (step.flops * batch * calls / kernel[i] / 1e9
                                    if kernel[i] and step.flops else None),
                         "bytes_read": read, "bytes_written": written,
                         "flop_per_byte": (step.flops * batch / (read + written)
                                           if step.flops else None)})
        return sorted(rows, key=lambda r: -r["ms"])

    def _profiled_schedule(self, entry: str | None):
        if entry is None:
            entry = "train_step" if "train_step" in self.entries else "forward"
        return self.plan(entry).schedule

    def allocated_bytes(self, batch: int, entry: str | None = None) -> int:
        return self.arena(self._profiled_schedule(entry), batch).allocated_bytes

    def _run_checked(self, arena: Arena, plan: Plan, arrays: dict, host: dict) -> None:
        """One step at a time, every output checked before the next step overwrites it (a copy
        computes nothing: the first kernel that reads a bad input is the one named)."""
        for index in range(plan.begin, plan.end):
            step = plan.schedule.steps[index]
            arena.run(driver.empty_profile(), shared=(index, index + 1))
            self._linked()
            self._check(step, {v: arena.view(v) for v in _checked(step)})

    @staticmethod
    def _check(step, arrays: dict) -> None:
        for value, array in arrays.items():
            if not np.all(np.isfinite(array)):
                raise FloatingPointError(f"kernel for node {step.name!r} ({step.op}) "
                                         f"produced NaN or Inf in {value!r}")


def _link(graph, target, cache_dir, compute: str) -> RankLink | None:
    """The link to the job's ranks of a graph with exchanges (`steps.EXCHANGE_KINDS`), sized
    for its widest; none for a graph without."""
    widths = [graph.value(n.inputs[0]).shape[0] for n in graph.nodes
              if kind_of(n.op) in EXCHANGE_KINDS]
    return RankLink(target, cache_dir, max(widths), DTYPE_BYTES[compute]) if widths else None


def _checked(step: Step) -> list[str]:
    """The outputs worth checking: not a copy's (it computes nothing), not float64 slots of
    partial sums (a later step sums them into what is checked)."""
    if step.op == "copy":
        return []
    return [v for v in step.outputs if v not in step.slots]


def _progress(what: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:5.1f} s] {what}", file=sys.stderr, flush=True)
