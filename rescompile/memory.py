"""Liveness and buffer reuse: a library that backends call, not a pass (it rewrites no graph).

    lifetimes(steps, keep)                     value -> (step making it, last step reading it)
    assign_buffers(sizes, lifetime, kinds)     value -> buffer, and the buffers' sizes
    plan_memory(graph, nodes, batch, keep)     a MemoryPlan of one entry's activations

The cuda backend places each entry's activations with `plan_memory` (`cuda/plan.py`, whose
report is the device bytes it allocates); the cpu backend packs the per-thread and shared
regions of its arena with `lifetimes` and `assign_buffers` (`cpu/arena.py`, whose summary is
the bytes it allocates). Each backend reports its own allocation: `rescompile dump --memory
--backend B` prints that report, never a plan the backend does not follow.

`plan_memory`'s `nodes` are a schedule (an entry's nodes, in order); `keep` names values that
must survive it (the entry's fetches, and in training the forward values a later entry reads).
The plan covers activations only: the values the schedule's nodes compute. Graph inputs and
values computed before the schedule (variables, the prepare entry's folded weights) are the
runtime's, and are not planned.

Algorithm: a value lives from the step that computes it to its last reader in the schedule (to
the end if kept), both ends included, so a node's outputs never share a buffer with its own
inputs (kernels need not run in place). Buffers are assigned greedily by size, largest value
first (TFLite's "greedy by size"): each value takes the smallest existing buffer that is large
enough and free for its whole lifetime, else a new buffer of its size. Largest-first means a
buffer's size is set by its first value and never grows. The peak is the sum of the buffers'
sizes; `live_peak_bytes`, the most bytes live at one step, bounds it from below.
For training, `saved_bytes` is what stays live across the forward/backward boundary: the
activations the backward pass needs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .ir import Graph


@dataclass
class MemoryPlan:
    batch: int
    buffer_of: dict[str, int]          # value -> buffer id
    buffer_bytes: list[int]            # buffer id -> size in bytes
    lifetime: dict[str, tuple[int, int]]  # value -> (step computing it, last step reading it)
    value_bytes: dict[str, int]
    live_peak_bytes: int               # the most bytes live at once (a lower bound on peak)
    saved_bytes: int                   # live across the first backward node (0 in infer)

    @property
    def peak_bytes(self) -> int:
        return sum(self.buffer_bytes)

    @property
    def largest_bytes(self) -> int:
        return max(self.value_bytes.values(), default=0)

    @property
    def total_bytes(self) -> int:
        """What the schedule would use with no reuse at all."""
        return sum(self.value_bytes.values())

    def summary(self) -> str:
        mib = 2.0 ** 20
        lines = [f"memory plan, batch {self.batch}: {len(self.value_bytes)} activations in "
                 f"{len(self.buffer_bytes)} buffers",
                 f"  peak activation bytes  {self.peak_bytes:>14,} "
                 f"({self.peak_bytes / mib:.1f} MiB)",
                 f"  live at once (max)     {self.live_peak_bytes:>14,}",
                 f"  largest activation     {self.largest_bytes:>14,} "
                 f"(peak = {self.peak_bytes / max(self.largest_bytes, 1):.2f}x)",
                 f"  without reuse          {self.total_bytes:>14,}"]
        if self.saved_bytes:
            lines.append(f"  saved for backward     {self.saved_bytes:>14,}")
        return "\n".join(lines) + "\n"


def plan_memory(graph: Graph, nodes, batch: int, keep=frozenset()) -> MemoryPlan:
    nodes = list(nodes)
    sizes = {v: _bytes(graph, v, batch) for n in nodes for v in n.outputs}
    lifetime = lifetimes(nodes, set(keep))
    assign, buffers = assign_buffers(sizes, lifetime)
    return MemoryPlan(batch, assign, buffers, lifetime, sizes,
                      _live_peak(len(nodes), sizes, lifetime), _saved(nodes, sizes, lifetime))


def _bytes(graph: Graph, value: str, batch: int) -> int:
    v = graph.values[value]
    return int(np.prod(v.concrete_shape(batch), dtype=np.int64)) * np.dtype(v.dtype).itemsize


def lifetimes(nodes, keep: set[str]) -> dict[str, tuple[int, int]]:
    """value -> (step computing it, last step reading it; the end if kept). `nodes` are
    anything with `inputs` and `outputs` (graph nodes, or a backend's steps)."""
    lifetime = {}
    for step, node in enumerate(nodes):
        for v in node.outputs:
            lifetime[v] = (step, len(nodes) if v in keep else step)
        for v in node.inputs:
            if v in lifetime:
                lifetime[v] = (lifetime[v][0], max(lifetime[v][1], step))
    return lifetime


def assign_buffers(sizes, lifetime, kinds=None) -> tuple[dict[str, int], list[int]]:
    """Greedy by size: (value -> buffer, buffer sizes). With `kinds` (value -> a hashable),
    values share a buffer only with values of the same kind (a zero-bordered layout, say).
    Each kind's buffers are kept sorted by size, so the smallest one that fits and is free
    is found by walking up from the first that fits."""
    kinds = kinds or {}
    buffers: list[int] = []
    by_kind: dict = {}  # kind -> sorted [(size, buffer id)]
    busy: list[list[tuple[int, int]]] = []  # per buffer: disjoint lifetimes, sorted
    assign: dict[str, int] = {}
    for v in sorted(sizes, key=lambda v: (-sizes[v], lifetime[v][0])):
        candidates = by_kind.setdefault(kinds.get(v), [])
        start = bisect.bisect_left(candidates, (sizes[v], -1))
        b = next((b for _, b in candidates[start:] if _free(busy[b], lifetime[v])), None)
        if b is None:
            b = len(buffers)
            buffers.append(sizes[v])
            busy.append([])
            bisect.insort(candidates, (sizes[v], b))
        bisect.insort(busy[b], lifetime[v])
        assign[v] = b
    return assign, buffers


def _free(intervals: list[tuple[int, int]], span: tuple[int, int]) -> bool:
    """Whether `span` overlaps none of the sorted, disjoint `intervals`."""
    i = bisect.bisect_left(intervals, span)
    before_ok = i == 0 or intervals[i - 1][1] < span[0]
    after_ok = i == len(intervals) or intervals[i][0] > span[1]
    return before_ok and after_ok


def _live_peak(steps: int, sizes, lifetime) -> int:
    delta = [0] * (steps + 2)
    for v, (first, last) in lifetime.items():
        delta[first] += sizes[v]
        delta[last + 1] -= sizes[v]
    return int(np.max(np.cumsum(delta), initial=0))


def _saved(nodes, sizes, lifetime) -> int:
    boundary = next((i for i, n in enumerate(nodes) if n.phase == "backward"), None)
    if boundary is None:
        return 0
    return sum(sizes[v] for v, (first, last) in lifetime.items()
               if first < boundary <= last)
