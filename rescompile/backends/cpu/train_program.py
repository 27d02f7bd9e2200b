"""The training program: one generated Numba kernel per schedule step, and per (entry, batch
size) an arena of preallocated buffers and a generated straight-line driver that calls the
kernels in step order. (Inference runs on the micro-kernel program, `program.py`; training
moves onto it next.)

A step is a node, or a group of nodes lowered together at its last member's place: every
momentum update of a training step becomes one kernel (`templates/update.find_update_group`).
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import numpy as np

from ... import ops
from ...errors import InputError
from ...passes.memory import plan_memory
from .blas import set_blas_threads
from .kernel_cache import compile_source
from .source import Lowering, serial
from .templates import lower_node
from .templates.update import find_update_group


class TrainProgram:
    name = "cpu"

    def __init__(self, graph, entries, dtype: str, cache_dir=None, check_finite: bool = False):
        self.graph, self.entries, self.dtype = graph, entries, dtype
        self.check_finite, self.cache_dir = check_finite, cache_dir
        self.lowerings: dict[tuple[str, bool], Lowering] = {}  # (step, threaded) -> lowering
        self.functions: dict[str, object] = {}  # kernel name -> compiled function
        self.groups: dict = {}  # group step name -> the group (templates.update.UpdateGroup)
        self._steps: dict[str, list] = {}
        for entry in entries.values():
            if entry.name != "prepare":
                for node in self.steps(entry):
                    self.lowering(node, threaded=True)
        self.arenas: dict[tuple[str, int], Arena] = {}
        self.prepared: dict[str, np.ndarray] = {}
        self.profile: dict[str, list[float]] | None = None

    def steps(self, entry) -> list:
        """The entry's schedule with the momentum updates replaced by one group step."""
        if entry.name not in self._steps:
            update = find_update_group(entry.nodes)
            groups = [update] if update else []
            at_last = {g.members[-1].name: g for g in groups}
            members = {m.name for g in groups for m in g.members}
            steps = []
            for node in entry.nodes:
                if node.name in at_last:
                    group = at_last[node.name]
                    steps.append(group.node)
                    self.groups[steps[-1].name] = group
                elif node.name not in members:
                    steps.append(node)
            self._steps[entry.name] = steps
        return self._steps[entry.name]

    def lowering(self, node, threaded: bool) -> Lowering:
        key = (node.name, threaded)
        if key not in self.lowerings:
            if node.name in self.groups:
                lowering = self.groups[node.name].lower(self.graph, self.dtype)
            else:
                lowering = lower_node(node, self.graph, self.dtype)
            self.lowerings[key] = lowering if threaded else serial(lowering)
            for call in self.lowerings[key].calls:
                kernel = call.kernel
                if kernel.name not in self.functions:
                    self.functions[kernel.name] = compile_source(kernel.name, kernel.source,
                                                                 self.cache_dir)
        return self.lowerings[key]

    def kernel_sources(self) -> dict[str, str]:
        """Generated source of every distinct kernel, by kernel name."""
        return {c.kernel.name: c.kernel.source for low in self.lowerings.values()
                for c in low.calls}

    def kernel_listing(self, node_filter: str | None = None, assembly: bool = False) -> str:
        """Each node's generated kernels, in schedule order, each distinct kernel once."""
        seen, parts = set(), []
        for (node, threaded), lowering in self.lowerings.items():
            if not threaded or (node_filter and node_filter not in node):
                continue
            for call in lowering.calls:
                header = f"# node {node}: {call.kernel.name}({', '.join(call.args)})"
                body = "" if call.kernel.name in seen else call.kernel.source
                seen.add(call.kernel.name)
                parts.append(header + "\n" + body)
        return "\n".join(parts)

    def run(self, entry_name: str, feeds: dict) -> dict:
        entry = self.entries[entry_name]
        if entry_name == "prepare":
            return self._prepare(entry, feeds)
        batch = self._batch(entry, feeds)
        arena = self.arenas.get((entry_name, batch))
        if arena is None:
            arena = self.arenas[(entry_name, batch)] = Arena(self, entry, batch)
        values = dict(feeds)
        values.update(self.prepared)
        if entry.after and entry.after != "prepare":
            values.update(self.arenas[(entry.after, batch)].buffers)
        # Kernels own the cores (prange); BLAS inside them must stay on one thread.
        set_blas_threads(1)
        arena.run(values)
        return {name: np.array(arena.lookup(name, values)).reshape(self._shape(name, batch))
                for name in entry.fetches}

    def start_profile(self) -> None:
        self.profile = {}

    def profile_rows(self, batch: int, calls: int = 1) -> list[dict]:
        """The profile of `calls` runs as rows per step (node or group), slowest first."""
        from ...dump import node_flops
        nodes = {n.name: n for n in self.graph.nodes}
        total = sum(seconds for _, seconds in self.profile.values())
        rows = []
        for name, (count, seconds) in self.profile.items():
            group = self.groups.get(name)
            members = list(group.members) if group else [nodes[name]]
            flops = sum(node_flops(self.graph, n) for n in members) * batch * count
            rows.append({"name": name, "op": members[0].op if len(members) == 1
                         else f"group of {len(members)}", "kernel": "", "calls": count // calls,
                         "ms": 1e3 * seconds / calls, "wait_ms": 0.0,
                         "percent": 100 * seconds / total if total else 0.0,
                         "gflops": flops / seconds / 1e9 if flops else None})
        return sorted(rows, key=lambda r: -r["ms"])

    def allocated_bytes(self, batch: int) -> int | None:
        peaks = [a.plan.peak_bytes for (_, b), a in self.arenas.items() if b == batch]
        return max(peaks) if peaks else None

    def _prepare(self, entry, feeds: dict) -> dict:
        env = dict(feeds)
        for node in entry.nodes:
            outs = ops.get(node.op).run_reference(node.attrs, *[env[i] for i in node.inputs])
            env.update(zip(node.outputs, outs))
        self.prepared = {name: np.ascontiguousarray(env[name]) for name in entry.fetches}
        return dict(self.prepared)

    def _batch(self, entry, feeds: dict) -> int:
        for name in entry.feeds:
            value = self.graph.value(name)
            if value.shape and value.shape[0] == "N":
                return int(feeds[name].shape[0])
        return self._last_batch(entry)

    def _last_batch(self, entry) -> int:
        batches = [b for (name, b) in self.arenas if name == entry.after]
        if not batches:
            raise InputError(f"entry {entry.name!r} needs {entry.after!r} to run first")
        return batches[-1]

    def keep(self, entry) -> set[str]:
        """Values that must survive an entry: its fetches and what later entries read."""
        later = [e for e in self.entries.values() if e.after == entry.name]
        return set(entry.fetches) | {i for e in later for n in e.nodes for i in n.inputs}

    def _shape(self, name: str, batch: int) -> tuple:
        return self.graph.value(name).concrete_shape(batch)

    def values(self, entry_name: str) -> dict:
        """Every buffer of the entry's last run (for tests); reused buffers hold their last
        occupant."""
        (arena,) = [a for (e, _), a in self.arenas.items() if e == entry_name][-1:]
        return dict(arena.buffers)


@dataclass
class Arena:
    """Buffers for one entry at one batch size, and its generated driver."""
    program: TrainProgram
    entry: object
    batch: int
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        graph, dtype = self.program.graph, self.program.dtype
        steps = self.program.steps(self.entry)
        self.plan = plan_memory(graph, steps, self.batch, self.program.keep(self.entry))
        threaded = self.batch > 1
        self.lowerings = {n.name: self.program.lowering(n, threaded) for n in steps}
        pool = [np.empty(size, dtype=np.uint8) for size in self.plan.buffer_bytes]
        for node in steps:
            for out in node.outputs:
                shape = graph.value(out).concrete_shape(self.batch) or (1,)
                raw = pool[self.plan.buffer_of[out]]
                count = int(np.prod(shape))
                self.buffers[out] = raw.view(dtype)[:count].reshape(shape)
            for temp, shape in self.lowerings[node.name].temps.items():
                shape = tuple(self.batch if d == "N" else d for d in shape)
                self.buffers[temp] = np.empty(shape, dtype=dtype)
        self.calls = [self._call(node, call) for node in steps
                      for call in self.lowerings[node.name].calls]
        self.kernel_fns = [fn for fn, _, _ in self.calls]
        self.driver = _driver(len(self.calls))
        # Buffer views are bound once; only fed values (inputs, variables, values another
        # entry left) are rebound per call.
        self.args = [[_view(self.buffers[n], how) if how != "pack" and n in self.buffers
                       else None for n, how in views] for _, views, _ in self.calls]
        fed, self.packs = {}, []
        for i, (_, views, _) in enumerate(self.calls):
            for j, (n, how) in enumerate(views):
                if how == "pack":
                    self.packs.append((i, j, n))
                    fed.update({m: fed.get(m, []) for m in n if m not in self.buffers})
                elif n not in self.buffers:
                    fed.setdefault(n, []).append((i, j, how))
        self.fed_names = list(fed)
        self.fed_slots = [fed[n] for n in self.fed_names]
        self.bound: list | None = None  # the fed arrays the arguments now view

    def _call(self, node, call):
        fn = self.program.functions[call.kernel.name]
        return fn, list(zip(call.args, call.kernel.views)), node

    def lookup(self, name: str, values: dict) -> np.ndarray:
        return self.buffers[name] if name in self.buffers else values[name]

    def run(self, values: dict) -> None:
        args = self.args
        current = [values[n] for n in self.fed_names]
        bound = self.bound
        if bound is None or not all(map(operator.is_, current, bound)):
            # Rebind only the arrays that changed (usually just the images): variables and
            # prepared weights are the same objects from one call to the next.
            for k, array in enumerate(current):
                if bound is None or array is not bound[k]:
                    for i, j, how in self.fed_slots[k]:
                        args[i][j] = _view(array, how)
            for i, j, names in self.packs:
                args[i][j] = tuple(_view(self.lookup(n, values), "flat") for n in names)
            self.bound = current
        if self.program.check_finite:
            return self._run_checked(args)
        if self.program.profile is not None:
            return self._run_profiled(args)
        self.driver(self.kernel_fns, args)

    def _run_checked(self, args) -> None:
        for (fn, _, node), call_args in zip(self.calls, args):
            fn(*call_args)
            for out in node.outputs:
                if not np.all(np.isfinite(self.buffers[out])):
                    raise FloatingPointError(f"kernel for node {node.name!r} ({node.op}) "
                                             f"produced NaN or Inf in {out!r}")

    def _run_profiled(self, args) -> None:
        for (fn, _, node), call_args in zip(self.calls, args):
            start = time.perf_counter()
            fn(*call_args)
            record = self.program.profile.setdefault(node.name, [0, 0.0])
            record[0] += 1
            record[1] += time.perf_counter() - start


def _view(array: np.ndarray, how: str) -> np.ndarray:
    if how == "rows":
        return array.reshape(-1, array.shape[-1])
    if how == "flat":
        return array.reshape(-1)
    return array.reshape(array.shape or (1,))


def _driver(count: int):
    """A straight-line function calling kernel i with argument list i, generated once."""
    lines = ["def drive(K, A):"] + [f"    K[{i}](*A[{i}])" for i in range(count)]
    if count == 0:
        lines.append("    return None")
    namespace: dict = {}
    exec("\n".join(lines), namespace)
    return namespace["drive"]
