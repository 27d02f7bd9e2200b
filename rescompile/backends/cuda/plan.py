"""An entry at one batch size as a list of kernel launches and the buffers they need.

Pure description: making a plan generates kernel source and places every value and scratch
buffer (memory.py's design note) but touches no device, so launch counts and device bytes can
be had anywhere (`count_launches`, `Plan.device_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import exprs, kernels
from .elementwise import Operand, loop_launch
from .launch import Context, Launch, Ref, value
from .memory import IN_PLACE, Group, Layout, arena_views, pool_scratch, variable_layout
from .target import GPU
from ...entries import kept_values
from ...memory import MemoryPlan, plan_memory


@dataclass
class Plan:
    launches: list[Launch]
    views: dict[str, Ref]               # computed values: slices of "A" (activations) or "V"
    feeds: dict[str, int]               # fed values with a buffer of their own -> elements
    scratch: dict[str, tuple[int, str]]  # node-private scratch as lowered -> (size, dtype)
    pools: dict[str, int]               # scratch pool per dtype -> elements (shared by nodes)
    arena: int                          # elements of this entry's activation arena "A"
    memory: MemoryPlan                  # memory.py's plan of the values in A's buffers
    shapes: dict[str, tuple] = field(default_factory=dict)

    def device_bytes(self, dtype: str) -> dict[str, int]:
        """What binding this plan allocates (the variables' arena V is the program's)."""
        item = np.dtype(dtype).itemsize
        return {"activations": self.arena * item,
                "feeds": sum(max(1, n) for n in self.feeds.values()) * item,
                "scratch": sum(n * np.dtype(d).itemsize for d, n in self.pools.items())}


def _usable(group: Group, entry, position: dict[str, int]) -> bool:
    """All members scheduled, and nobody reads an overwritten variable after the group."""
    if not all(n.name in position for n in group.nodes):
        return False
    last = max(position[n.name] for n in group.nodes)
    aliased = {node.inputs[p] for node in group.nodes for p in IN_PLACE[group.op]}
    later = entry.nodes[last + 1:]
    return not any(aliased.intersection(n.inputs) for n in later) and \
        not aliased.intersection(entry.fetches)


def _group_launch(ctx: Context, group: Group, layout: Layout, arena: dict[str, Ref]) -> Launch:
    """One elementwise kernel over the group's contiguous slices, outputs in place."""
    first = group.nodes[0]
    operands = []
    for p, kind in enumerate(group.operand_kinds(ctx.graph)):
        if kind == "scalar":
            operands.append(Operand(value(first.inputs[p]), "0", 1))
            continue
        refs = [layout_ref(layout, n.inputs[p]) if kind == "var" else arena[n.inputs[p]]
                for n in group.nodes]
        size = sum(r.size for r in refs)
        operands.append(Operand(Ref("region", refs[0].name, refs[0].offset, size), "i", size))
    outs = [operands[p] for p in IN_PLACE[group.op]]
    total = outs[0].size
    rule = exprs.RULES[group.op]
    return loop_launch(ctx, f"{group.op} x{len(group.nodes)}", total, operands, outs,
                       lambda e, loads: rule(e, first.attrs, *loads),
                       f"{group.op} fused over {len(group.nodes)} nodes")


def layout_ref(layout: Layout, name: str) -> Ref:
    offset, size = layout.slots[name]
    return Ref("region", "V", offset, size)


def build_plan(graph, entry, layout: Layout, batch, dtype: str, target,
               keep=frozenset(), reuse: bool = True) -> Plan:
    """`keep`: values that must outlive the entry (`kept_values`); `reuse=False` gives every
    value a buffer of its own (for differential tests)."""
    ctx = Context(graph, batch, dtype, target)
    position = {node.name: i for i, node in enumerate(entry.nodes)}
    groups = [g for g in layout.groups if _usable(g, entry, position)]
    # Group operands, contiguous per (group, position) in node order; outputs in place in V.
    operands = [node.inputs[p] for group in groups
                for p, kind in enumerate(group.operand_kinds(graph)) if kind == "computed"
                for node in group.nodes]
    in_place = {out: layout_ref(layout, node.inputs[p]) for group in groups
                for node in group.nodes for out, p in zip(node.outputs, IN_PLACE[group.op])}
    # Everything else the entry computes gets a buffer from the memory plan.
    unplanned = set(operands) | set(in_place) | set(layout.slots)
    nodes = [n.replace(outputs=tuple(o for o in n.outputs if o not in unplanned))
             for n in entry.nodes]
    computed = {o for n in nodes for o in n.outputs}
    memory = plan_memory(graph, nodes, batch, computed if not reuse else keep)
    views, arena_size = arena_views(memory, {v: ctx.size(v) for v in computed})
    for name in operands:
        views[name] = Ref("region", "A", arena_size, ctx.size(name))
        arena_size += ctx.size(name)
    views.update(in_place)
    grouped = {n.name: g for g in groups for n in g.nodes}
    launches: list[Launch] = []
    for node in entry.nodes:
        group = grouped.get(node.name)
        if group is None:
            launches += kernels.lower(ctx, node)
        elif node is group.nodes[-1]:
            launches.append(_group_launch(ctx, group, layout, views))
    launches, pools = pool_scratch(launches, ctx.scratch)
    # A fed value that a group launch reads from its contiguous region is copied there.
    feeds = {v: ctx.size(v) for v in entry.feeds if v not in layout.slots and v not in views}
    produced = {o for n in entry.nodes for o in n.outputs} | set(entry.feeds)
    return Plan(launches, views, feeds, ctx.scratch, pools, arena_size, memory,
                {v: ctx.shape(v) for v in produced | set(entry.fetches)})


def memory_report(graph, entries, entry: str, batch: int, dtype: str = "float32",
                  target=GPU) -> str:
    """What the backend allocates on the device to run `entry` at `batch`: the variables'
    arena, and the entry's activations (as its memory plan places them), feeds and scratch
    pools (a plan needs no device)."""
    kernels.check_supported(entries[entry].nodes)
    layout = variable_layout(graph)
    plan = build_plan(graph, entries[entry], layout, batch, dtype, target,
                      kept_values(entries, entries[entry]))
    mib, item = 2.0 ** 20, np.dtype(dtype).itemsize
    allocated = {"variables": layout.size * item, **plan.device_bytes(dtype)}
    lines = [f"cuda device memory, entry {entry}, batch {batch}"]
    lines += [f"  {what:<12} {n:>14,} bytes ({n / mib:.1f} MiB)" for what, n in allocated.items()]
    lines.append(f"  in all       {sum(allocated.values()):>14,} bytes")
    return "\n".join(lines) + "\n" + plan.memory.summary()


def count_launches(graph, entries, batch: int, dtype: str = "float32", target=GPU
                   ) -> dict[str, int]:
    """Kernel launches per call of each entry at `batch` (needs no GPU)."""
    for entry in entries.values():
        kernels.check_supported(entry.nodes)
    layout = variable_layout(graph)
    return {name: len(build_plan(graph, entry, layout, batch, dtype, target,
                                 kept_values(entries, entry)).launches)
            for name, entry in entries.items()}
