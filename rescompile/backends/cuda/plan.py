"""An entry at one batch size as a list of kernel launches and the buffers they need.

Pure description: making a plan generates kernel source but touches no device, so launch
counts can be had anywhere (`count_launches`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import exprs, kernels
from .elementwise import Operand, loop_launch
from .launch import Context, Launch, Ref, value
from .memory import IN_PLACE, Group, Layout, variable_layout
from .target import GPU


@dataclass
class Plan:
    launches: list[Launch]
    views: dict[str, Ref]               # values living in an arena ("V" or "G")
    buffers: dict[str, int]             # values with their own buffer -> element count
    scratch: dict[str, tuple[int, str]]  # plan-private buffers (partials, split-K)
    arena: int                          # size of this entry's G arena
    shapes: dict[str, tuple] = field(default_factory=dict)


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


def build_plan(graph, entry, layout: Layout, batch, dtype: str, target) -> Plan:
    ctx = Context(graph, batch, dtype, target)
    position = {node.name: i for i, node in enumerate(entry.nodes)}
    groups = [g for g in layout.groups if _usable(g, entry, position)]
    views: dict[str, Ref] = {}
    arena_size = 0
    for group in groups:
        for p, kind in enumerate(group.operand_kinds(graph)):
            for node in group.nodes:
                if kind == "computed":
                    size = ctx.size(node.inputs[p])
                    views[node.inputs[p]] = Ref("region", "G", arena_size, size)
                    arena_size += size
        for node in group.nodes:
            for out, p in zip(node.outputs, IN_PLACE[group.op]):
                views[out] = layout_ref(layout, node.inputs[p])
    grouped = {n.name: g for g in groups for n in g.nodes}
    launches: list[Launch] = []
    for node in entry.nodes:
        group = grouped.get(node.name)
        if group is None:
            launches += kernels.lower(ctx, node)
        elif node is group.nodes[-1]:
            launches.append(_group_launch(ctx, group, layout, views))
    produced = {o for n in entry.nodes for o in n.outputs} | set(entry.feeds)
    buffers = {v: ctx.size(v) for v in produced if v not in views and v not in layout.slots}
    return Plan(launches, views, buffers, ctx.scratch, arena_size,
                {v: ctx.shape(v) for v in produced | set(entry.fetches)})


def count_launches(graph, entries, batch: int, dtype: str = "float32", target=GPU
                   ) -> dict[str, int]:
    """Kernel launches per call of each entry at `batch` (needs no GPU)."""
    for entry in entries.values():
        kernels.check_supported(entry.nodes)
    layout = variable_layout(graph)
    return {name: len(build_plan(graph, entry, layout, batch, dtype, target).launches)
            for name, entry in entries.items()}
