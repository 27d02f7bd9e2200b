"""The CPU inference program: the schedule's micro-kernels, compiled once, run by the driver.

`prepare` (parameter-only nodes: folded BN weights) runs once per variable load with the ops'
float64 definitions, which is what those nodes are: constants of the loaded weights. Conv
weights are then packed into the panels the micro-kernel reads, once per weight array.
`forward` binds the fed images and current weights to an arena for the batch size and runs the
whole schedule in one call of the driver.

Nothing is compiled per layer: the kernels are the distinct micro-kernels the schedule uses
(one per dtype, instruction set and epilogue), the driver is one Numba function for all.
"""

from __future__ import annotations

import time

import numpy as np

from ..reference import interpret
from . import driver
from .arena import Arena, aligned_empty
from .llvm import jit, measure, sync
from .schedule import build_schedule
from .target import target_for


def pack_weights(w: np.ndarray, nr: int, out: np.ndarray | None = None) -> np.ndarray:
    """HWIO (or [C, K]) weights as [panel][kh * kw * cin][nr], zero-padded past the last
    output channel, on a cache-line boundary (the kernel's aligned loads need it)."""
    flat = w.reshape(-1, w.shape[-1])
    depth, cout = flat.shape
    panels = -(-cout // nr)
    if out is None:
        out = aligned_empty(panels * depth * nr * w.itemsize).view(w.dtype)
    padded = np.zeros((depth, panels * nr), w.dtype)
    padded[:, :cout] = flat
    out.reshape(panels, depth, nr)[:] = padded.reshape(depth, panels, nr).transpose(1, 0, 2)
    return out


class CpuProgram:
    name = "cpu"

    def __init__(self, graph, entries, dtype: str, cache_dir=None, check_finite: bool = False,
                 isa: str | None = None):
        self.graph, self.entries, self.dtype = graph, entries, dtype
        self.check_finite = check_finite
        self.target = target_for(isa)
        start = time.perf_counter()
        self.schedule = build_schedule(graph, entries["forward"], self.target, dtype)
        self.kernels = list(dict.fromkeys(step.kernel for step in self.schedule.steps))
        self.addresses = {k: jit.address(k, cache_dir) for k in self.kernels}
        self.barrier = jit.address(sync.Barrier(self.target), cache_dir)
        self.kernel_seconds = time.perf_counter() - start
        self.arenas: dict[tuple[int, int], Arena] = {}
        self.prepared: dict[str, np.ndarray] = {}
        self._packed: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.profile: np.ndarray | None = None  # per (thread, step): cycles, wait, calls

    # -- kernels --------------------------------------------------------------------------
    def kernel_sources(self) -> dict[str, str]:
        """The IR of every distinct micro-kernel, by symbol."""
        sources = {k.symbol: k.ir() for k in self.kernels}
        sources[sync.SYMBOL] = sync.barrier_ir()
        return sources

    def kernel_listing(self, node_filter: str | None = None, assembly: bool = False) -> str:
        """Each step's kernel call in schedule order, and each distinct kernel's IR (or its
        optimised assembly) once, after its first call."""
        seen, parts = set(), []
        for step in self.schedule.steps:
            if node_filter and node_filter not in step.name:
                continue
            args = ", ".join(f"{role}={use.value}" for role, use in step.uses.items())
            parts.append(f"# node {step.name}: {step.kernel.symbol}({args})")
            if step.kernel not in seen:
                seen.add(step.kernel)
                ir_text = step.kernel.ir()
                parts.append(jit.assembly(ir_text, self.target) if assembly else ir_text)
        return "\n".join(parts) + "\n"

    def packed_arrays(self) -> list[tuple[tuple[str, int], np.ndarray]]:
        return [(key, packed) for key, (_, packed) in self._packed.items()]

    def packed(self, value: str, nr: int, arrays: dict) -> np.ndarray:
        """`value`'s weights packed for panels of nr channels, repacked if the array changed."""
        source = arrays[value]
        have = self._packed.get((value, nr))
        if have is None or have[0] is not source:
            out = have[1] if have is not None else None
            self._packed[(value, nr)] = (source, pack_weights(source, nr, out))
        return self._packed[(value, nr)][1]

    # -- running --------------------------------------------------------------------------
    def run(self, entry_name: str, feeds: dict) -> dict:
        entry = self.entries[entry_name]
        if entry_name == "prepare":
            env = interpret(entry.nodes, dict(feeds))
            self.prepared = {name: np.ascontiguousarray(env[name]) for name in entry.fetches}
            return dict(self.prepared)
        arrays = dict(feeds)
        arrays.update(self.prepared)
        batch = int(arrays[entry.feeds[0]].shape[0])
        arena = self.arena(batch)
        arena.bind(arrays)
        if self.check_finite:
            self._run_checked(arena)
        else:
            arena.run(self._profile_table(arena))
        return {name: arena.fetch(name, self.graph.value(name).concrete_shape(batch))
                for name in entry.fetches}

    def arena(self, batch: int) -> Arena:
        key = (batch, driver.threads())
        if key not in self.arenas:
            self.arenas[key] = Arena(self, *key, shared_only=self.check_finite)
        return self.arenas[key]

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

    def profile_rows(self, batch: int, calls: int = 1) -> list[dict]:
        """The profile of `calls` runs at `batch` as rows per step, slowest first: kernel
        milliseconds per run (thread time over the threads, about its share of the wall time),
        waits at barriers, and the kernel's GFLOP/s per thread."""
        hz = measure.cycles_per_second(self.target)
        table = self.profile
        steps = self.schedule.steps
        kernel = (table[:, :len(steps), 0] + table[:, len(steps):, 0]).sum(axis=0) / hz
        wait = (table[:, :len(steps), 1] + table[:, len(steps):, 1]).sum(axis=0) / hz
        counted = (table[:, :len(steps), 2] + table[:, len(steps):, 2]).sum(axis=0)
        threads, total = table.shape[0], kernel.sum()
        rows = []
        for i, step in enumerate(steps):
            rows.append({"name": step.name, "op": step.op, "kernel": step.kernel.symbol,
                         "calls": int(counted[i]) // calls,
                         "ms": 1e3 * kernel[i] / threads / calls,
                         "wait_ms": 1e3 * wait[i] / threads / calls,
                         "percent": 100 * kernel[i] / total if total else 0.0,
                         "gflops": (step.flops * batch * calls / kernel[i] / 1e9
                                    if kernel[i] and step.flops else None)})
        return sorted(rows, key=lambda r: -r["ms"])

    def allocated_bytes(self, batch: int) -> int:
        return self.arena(batch).allocated_bytes

    def _run_checked(self, arena: Arena) -> None:
        """One step at a time, every output checked before the next step overwrites it (a copy
        computes nothing: the first kernel that reads a bad input is the one named)."""
        for index, step in enumerate(self.schedule.steps):
            arena.run(driver.empty_profile(), shared=(index, index + 1))
            for value in step.outputs if step.op != "copy" else ():
                if not np.all(np.isfinite(arena.view(value))):
                    raise FloatingPointError(f"kernel for node {step.name!r} ({step.op}) "
                                             f"produced NaN or Inf in {value!r}")
