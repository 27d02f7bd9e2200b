"""Where values live on the device.

Design note
-----------
- Variables (params and state: weights, moving statistics, optimizer slots) live in one flat
  device arena `V` for the program's lifetime, each a slice. They are uploaded only when the
  host object fed for them is not the one last mirrored (identity, see program.py).
- Update groups: the update nodes of one op and attrs (all momentum updates of a model, all
  moving averages) run as ONE kernel over contiguous slices. So the layout puts each group's
  variable operands (w, then accum) side by side in V in node order, and each entry puts the
  group's computed operands (gradients, batch statistics) side by side in an entry arena `G`.
  The group writes its outputs in place over the variables: every reader of the old values
  runs before it (updates are the last phase; checked per entry, else no grouping).
- Activations: per (entry, batch size) one device arena `A`. The values the entry computes
  (outside the groups) are placed by `memory.plan_memory` (the liveness library the CPU arena
  uses too): values whose lifetimes do not overlap share a planned buffer, and a buffer is a
  slice of A starting on a 256-byte boundary. `keep` (the entry's fetches and whatever a
  later entry reads: backward reads forward's activations) makes a value live to the end of
  the entry, so it is never overwritten within the run. The group operands follow the
  planned buffers in A, unplanned.
  Nothing in A aliases V: the in-place updates write V only, and their outputs are V's slices.
  Feeds (images, labels, scalars) are uploaded into small buffers of their own.
- Kernel scratch (split-K partials, reduction partials) is neither planned nor in A: one pool
  per dtype, shared by all nodes. A node's scratch is only touched by that node's launches,
  which run back to back on one stream, so nodes reuse the same addresses; scratch of one node
  with several tags gets disjoint offsets. A pool is as large as the most one node needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...ops.registry import numel
from .launch import Ref

# update op -> the input each output overwrites in place
IN_PLACE = {"momentum_update": (0, 1), "nesterov_update": (0, 1), "sgd_update": (0,),
            "moving_average": (0,)}


@dataclass(frozen=True)
class Group:
    op: str
    nodes: tuple  # Node objects, in graph order

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.nodes}

    def operand_kinds(self, graph) -> list[str]:
        """Per input position: "var" (overwritten in place), "scalar" or "computed"."""
        first = self.nodes[0]
        return ["var" if p in IN_PLACE[self.op] else
                "scalar" if graph.value(v).shape == () else "computed"
                for p, v in enumerate(first.inputs)]


@dataclass
class Layout:
    slots: dict[str, tuple[int, int]]  # variable -> (offset, size) in V
    size: int
    groups: list[Group]


def _group_key(graph, node) -> tuple:
    scalars = tuple(v for v in node.inputs if graph.value(v).shape == ())
    return node.op, repr(sorted(node.attrs.items())), scalars


def _groupable(graph, nodes, taken: set[str]) -> bool:
    variables = {n for n, r in graph.inputs.items() if r in ("param", "state")}
    aliased = [node.inputs[p] for node in nodes for p in IN_PLACE[node.op]]
    computed = [v for node in nodes for v in node.inputs
                if v not in variables and graph.value(v).shape != ()]
    return (all(v in variables for v in aliased) and
            len(set(aliased)) == len(aliased) and not taken.intersection(aliased) and
            len(set(computed)) == len(computed) and
            not any(v in graph.inputs for v in computed))


def variable_layout(graph) -> Layout:
    buckets: dict[tuple, list] = {}
    for node in graph.nodes:
        if node.op in IN_PLACE:
            buckets.setdefault(_group_key(graph, node), []).append(node)
    slots: dict[str, tuple[int, int]] = {}
    offset = 0

    def place(name):
        nonlocal offset
        size = max(1, numel(graph.value(name).shape))
        slots[name] = (offset, size)
        offset += size

    groups = []
    for (op, _, _), nodes in buckets.items():
        if not _groupable(graph, nodes, set(slots)):
            continue
        groups.append(Group(op, tuple(nodes)))
        for p in IN_PLACE[op]:
            for node in nodes:
                place(node.inputs[p])
    for name, role in graph.inputs.items():
        if role in ("param", "state") and name not in slots:
            place(name)
    return Layout(slots, offset, groups)


ALIGN = 64  # elements: every planned buffer and scratch slice starts 256 bytes aligned (fp32)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def arena_views(memory, sizes: dict[str, int], name: str = "A") -> tuple[dict[str, Ref], int]:
    """Each planned value as a slice of one arena: buffer b of `memory` (a passes.memory
    MemoryPlan) starts at an aligned offset and is as long as its largest value (`sizes`, in
    elements). Returns (value -> Ref, arena elements)."""
    lengths = [0] * len(memory.buffer_bytes)
    for v, b in memory.buffer_of.items():
        lengths[b] = max(lengths[b], sizes[v])
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += align(length)
    views = {v: Ref("region", name, starts[b], sizes[v]) for v, b in memory.buffer_of.items()}
    return views, offset


def pool_scratch(launches, scratch: dict[str, tuple[int, str]]):
    """Rewrite the launches' scratch Refs as slices of one pool per dtype ("scratch/<dtype>").
    Returns (launches, dtype -> pool elements). Relies on scratch being named by its node
    (Context.temp) and a node's launches being consecutive; checked here."""
    placed: dict[str, Ref] = {}
    pools: dict[str, int] = {}
    node, used = None, {}
    out = []
    for launch in launches:
        if launch.node != node:
            node, used = launch.node, {}
        args = []
        for ref in launch.args:
            if ref.kind == "scratch":
                if ref.name not in placed:
                    if not ref.name.startswith(launch.node + "#"):
                        raise AssertionError(f"scratch {ref.name!r} used by a launch of "
                                             f"{launch.node!r}: pooling assumes node-private "
                                             f"scratch")
                    size, dtype = scratch[ref.name]
                    start = used.get(dtype, 0)
                    placed[ref.name] = Ref("region", f"scratch/{dtype}", start, size)
                    used[dtype] = align(start + size)
                    pools[dtype] = max(pools.get(dtype, 0), used[dtype])
                elif not ref.name.startswith(launch.node + "#"):
                    raise AssertionError(f"scratch {ref.name!r} read outside its node")
                ref = placed[ref.name]
            args.append(ref)
        out.append(dataclasses.replace(launch, args=tuple(args)))
    return out, pools
