"""Chains of fused convs (a bottleneck unit) lowered onto one cross-layer tiled kernel.

Design note
-----------
`find_units` walks an entry's schedule and groups `fused_conv2d` nodes by data flow: node A
joins B when A's only output is read by B alone (as B's conv input, nowhere else in the graph)
and is not kept past the entry. A group is then a chain whose intermediate values exist only
inside the kernel (`unit_codegen`: per-thread scratch), so they need no buffers. In training
the backward pass reads every conv output, so no chain forms and the per-node path runs.

Every refusal has a reason; `find_units` returns them beside the groups so callers can say why
a unit was not fused (two consumers, batch statistics, a second output mid-chain, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ....ir import Node
from ..source import Call, Kernel, Lowering
from ..unit_codegen import Layer, UnitSig, unit_kernel_source
from .conv import _out2_in_kernel, _sig, _Translation

GROUP_OP = "fused_unit"


@dataclass(frozen=True)
class Group:
    members: tuple[Node, ...]

    @property
    def node(self) -> Node:
        """The group as one schedule step: the chain's external inputs and its last outputs."""
        inside = {o for m in self.members[:-1] for o in m.outputs}
        inputs = []
        for m in self.members:
            inputs += [i for i in m.inputs if i not in inside and i not in inputs]
        last = self.members[-1]
        return Node(name="+".join(m.name for m in self.members), op=GROUP_OP,
                    inputs=tuple(inputs), outputs=last.outputs, scope=last.scope,
                    phase=last.phase)

    def lower(self, graph, dtype: str) -> Lowering:
        return lower_group(self, graph, dtype)


def _inner_refusal(node: Node) -> str | None:
    """Why `node` cannot be a non-last member (its output stays in scratch), or None."""
    attrs = node.attrs
    if node.op != "fused_conv2d":
        return f"{node.op} is not a fused_conv2d"
    if attrs.get("out2") or attrs.get("stats") or len(node.outputs) != 1:
        return "has a second output or batch statistics"
    if any(s["op"] not in ("bias_add", "affine", "relu") for s in attrs["epilogue"]):
        return "its epilogue is not bias/affine/relu only"
    return None


def _last_refusal(node: Node) -> str | None:
    attrs = node.attrs
    if node.op != "fused_conv2d":
        return f"{node.op} is not a fused_conv2d"
    if attrs.get("stats"):
        return "computes batch statistics"
    if any(s["op"] == "batch_normalize" for s in attrs["epilogue"]):
        return "normalizes with batch statistics"
    out2 = list(attrs.get("out2") or [])
    if out2 and not (_out2_in_kernel(out2) and out2[0]["op"] == "affine"):
        return "its second output is not relu(affine(y))"
    return None


def find_units(graph, nodes, keep) -> tuple[list[Group], dict[str, str]]:
    """Chains of at least two fused convs in schedule `nodes`; and why a conv whose output has
    one reader did not join that reader's chain (node name -> reason)."""
    consumers = graph.consumers()
    in_schedule = {n.name for n in nodes}
    groups, refused, taken = [], {}, set()
    for node in nodes:
        if node.name in taken or node.op != "fused_conv2d":
            continue
        chain = [node]
        while True:
            cur = chain[-1]
            reason = _inner_refusal(cur)
            out = cur.outputs[0]
            readers = consumers.get(out, [])
            if reason is None and out in keep:
                reason = "its output is kept past the entry"
            if reason is None and len(readers) != 1:
                reason = f"its output has {len(readers)} readers"
            if reason is None:
                nxt = readers[0]
                if nxt.name not in in_schedule or nxt.op != "fused_conv2d":
                    reason = "its reader is not a fused_conv2d of this entry"
                elif nxt.inputs[0] != out or out in nxt.inputs[1:]:
                    reason = "its reader uses it as more than the conv input"
                else:
                    reason = _last_refusal(nxt)
            if reason is not None:
                if len(chain) > 1 or len(readers) == 1:
                    refused[cur.name] = reason
                break
            chain.append(readers[0])
        if len(chain) >= 2:
            groups.append(Group(tuple(chain)))
            taken.update(m.name for m in chain)
    return groups, refused


def lower_group(group: Group, graph, dtype: str) -> Lowering:
    layers, args, pre, temps = [], [], [], {}
    last = len(group.members) - 1
    for index, node in enumerate(group.members):
        x, w = (graph.value(v).shape for v in node.inputs[:2])
        t = _Translation(node, dtype, w[3])
        for step_index, step in enumerate(node.attrs["epilogue"]):
            t.step(step, step_index)
        sig = _sig("forward", x, w, node.attrs, dtype)
        layers.append(Layer(sig.h, sig.w, sig.cin, sig.cout, sig.k, sig.stride, sig.pads,
                            tuple(t.steps)))
        args += [node.inputs[1]] + t.args
        pre += t.pre
        temps.update(t.temps)
        if index == last:
            out2 = list(node.attrs.get("out2") or [])
            if out2:
                args += t.affine_operands(out2[0], "2")
            has_out2, alpha2 = bool(out2), (out2[1]["alpha"] if out2 else 0.0)
    sig = UnitSig(tuple(layers), dtype, has_out2, alpha2)
    name, source = unit_kernel_source(sig)
    outs = group.members[-1].outputs
    kernel = Kernel(name, source, ("nd",) * (1 + len(args) + len(outs)))
    call = Call(kernel, (group.members[0].inputs[0],) + tuple(args) + tuple(outs))
    return Lowering(tuple(pre) + (call,), temps)
