"""fuse_epilogues and fuse_elementwise: grow kernels along chains of elementwise ops.

What: starting from a head node (a `conv2d` for fuse_epilogues; any epilogue op for
fuse_elementwise), follow the head's value forward. While the value has exactly one consumer
and that consumer is an epilogue op (`ops/fused.py`: bias_add, affine, relu, add,
batch_normalize), absorb it as the next epilogue step. When the value has several consumers it
stays materialised, and one elementwise consumer chain may become the kernel's second output
(`out2`): the next unit needs both `x + shortcut` and `relu(affine(x + shortcut))` (where
only 1 x 1 convs read the second output, `fuse_prologues` later moves it into them).

    conv2d -> bias_add -> relu              fused_conv2d epilogue=[bias_add, relu]
    conv2d -> add(., shortcut) -> affine -> relu, and the sum feeds the next shortcut
                                            fused_conv2d epilogue=[add], out2=[affine, relu]

A fused node takes the head's name and the last absorbed node's output names, so consumers and
public outputs are untouched; it stands where its last member stood (then the graph is
re-sorted). Refusals, each reported: the consumer is already in another kernel, is in another
phase, does not take the value as its first operand (add is commutative, so either), needs an
operand computed from this kernel's own output (a batch statistic, a later unit), or the value
is a public output (it then stays, and can only be followed through out2).

Numerics: none. The fused op's reference is the composition of the absorbed ops' references,
applied in the same order to the same operands (add's operands may swap, which IEEE addition
does not notice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Node
from ..ops.registry import epilogue_form, kind_of, ops_of_kind
from .base import PassResult
from .rewrite import computed_from, made_by, make_node, rebuild


def fuse_epilogues(graph: Graph) -> PassResult:
    """Absorb elementwise consumers into each convolution's epilogue."""
    convs = [op for op in ops_of_kind("conv") if epilogue_form(op) not in (None, op)]
    return _Fuser(graph).run(convs)


def fuse_elementwise(graph: Graph) -> PassResult:
    """Merge the remaining chains of elementwise ops into one fused_elementwise each."""
    return _Fuser(graph).run(ops_of_kind("epilogue"), "fused_elementwise")


@dataclass
class _Group:
    """A kernel being grown: the head's operands plus the operands absorbed steps need."""
    head: Node
    inputs: list[str]
    y: str
    members: list[Node]
    epilogue: list[dict] = field(default_factory=list)
    out2: list[dict] = field(default_factory=list)
    y2: str | None = None

    def operand(self, value: str) -> int:
        if value not in self.inputs:
            self.inputs.append(value)
        return self.inputs.index(value)

    def step(self, node: Node, value: str) -> dict:
        """`node` as an epilogue step applied to `value` (its first operand, or add's either)."""
        others = list(node.inputs)
        others.remove(value)
        return {"op": node.op, "args": [self.operand(v) for v in others], **node.attrs}

    def outputs(self) -> set[str]:
        return {o for m in self.members for o in m.outputs}


class _Fuser:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.consumers = graph.consumers()
        self.protected = set(graph.outputs.values())
        self.position = {n.name: i for i, n in enumerate(graph.nodes)}
        # value -> (position of what computes it, that computation's inputs); fused kernels
        # replace their members here as they are made.
        self.made_by = made_by(graph.nodes)
        self.taken: dict[str, str] = {}  # absorbed node -> the kernel it joined
        self.remarks: list[tuple[str, str]] = []

    def run(self, heads, fused_op: str | None = None) -> PassResult:
        """Grow a kernel from each node of a `heads` op, as `fused_op` (by default the
        head's epilogue form)."""
        values = dict(self.graph.values)
        placed: dict[int, Node] = {}
        for node in self.graph.nodes:
            if node.op not in heads or node.name in self.taken:
                continue
            group = self._start(node)
            self._grow(group)
            if len(group.members) > 1:
                self.taken[node.name] = node.name
                placed.update(self._emit(group, fused_op or epilogue_form(node.op), values))
        if not placed:
            return PassResult(self.graph, False, self.remarks)
        nodes = [placed.get(i, n) for i, n in enumerate(self.graph.nodes)
                 if i in placed or n.name not in self.taken]
        return PassResult(rebuild(self.graph, nodes, values), True, self.remarks)

    # -- growing ------------------------------------------------------------------------------
    def _start(self, head: Node) -> _Group:
        """A kernel's head, or an elementwise head as the first step on its input."""
        if kind_of(head.op) != "epilogue":
            return _Group(head, list(head.inputs), head.outputs[0], [head])
        group = _Group(head, [head.inputs[0]], head.outputs[0], [head])
        group.epilogue.append(group.step(head, head.inputs[0]))
        return group

    def _grow(self, group: _Group) -> None:
        while True:
            users = self.consumers[group.y]
            if len(users) != 1 or group.y in self.protected:
                break
            if not self._absorb(group, users[0], group.y, group.epilogue):
                return
            group.y = users[0].outputs[0]
        self._branch(group, users)

    def _branch(self, group: _Group, users: list[Node]) -> None:
        """Make the first elementwise consumer that can fuse the second output, and grow it."""
        for user in users:
            if self._absorb(group, user, group.y, group.out2):
                group.y2 = user.outputs[0]
                break
        else:
            return
        while len(self.consumers[group.y2]) == 1 and group.y2 not in self.protected:
            user = self.consumers[group.y2][0]
            if not self._absorb(group, user, group.y2, group.out2):
                return
            group.y2 = user.outputs[0]

    def _absorb(self, group: _Group, user: Node, value: str, steps: list[dict]) -> bool:
        if kind_of(user.op) != "epilogue":
            return False
        reason = self._refusal(group, user, value)
        if reason:
            self.remarks.append((user.name, f"not fused into {group.head.name}: {reason}"))
            return False
        steps.append(group.step(user, value))
        group.members.append(user)
        self.taken[user.name] = group.head.name
        return True

    def _refusal(self, group: _Group, user: Node, value: str) -> str | None:
        if user.name in self.taken:
            return f"already fused into {self.taken[user.name]}"
        if user.phase != group.head.phase:
            return f"it is in the {user.phase} phase, the kernel in {group.head.phase}"
        if user.op != "add" and user.inputs[0] != value:
            return f"{value} is not its first operand"
        others = list(user.inputs)
        others.remove(value)
        for v in others:
            if self._depends(v, group):
                return f"operand {v} is computed from the kernel's own output"
        return None

    def _depends(self, value: str, group: _Group) -> bool:
        """Whether `value` is computed from the group's members."""
        return computed_from(self.made_by, value, group.outputs(),
                             self.position[group.head.name])

    # -- emitting ----------------------------------------------------------------------------
    def _emit(self, group: _Group, fused_op: str, values) -> dict[int, Node]:
        head = group.head
        attrs = dict(head.attrs) if kind_of(head.op) != "epilogue" else {}
        attrs["epilogue"] = group.epilogue
        outputs = [group.y]
        if group.out2:
            attrs["out2"] = group.out2
            outputs.append(group.y2)
        node = make_node(values, fused_op, group.inputs, attrs, name=head.name,
                         scope=head.scope, phase=head.phase, outputs=outputs)
        last = max(self.position[m.name] for m in group.members)
        for out in outputs:
            self.made_by[out] = (last, node.inputs)
        return {last: node}
