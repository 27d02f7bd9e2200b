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
- Every other computed value gets its own buffer, allocated once per (entry, batch size).
  There is no liveness-based reuse yet (rescompile/passes/memory.py does not exist yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ops.registry import numel

# update op -> the input each output overwrites in place
IN_PLACE = {"momentum_update": (0, 1), "sgd_update": (0,), "moving_average": (0,)}


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
