"""What a pass is: a named function `Graph -> PassResult`, in the style of torch.fx's pass
infrastructure. A pass never mutates its input graph; it returns a new one, says whether it
changed anything, and explains every rewrite it refused (a `Remark`), so that a fusion that did
not happen is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..ir import Graph


@dataclass(frozen=True)
class Remark:
    """A rewrite a pass considered and refused, and why."""
    pass_name: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.pass_name}] {self.node}: {self.reason}"


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    remarks: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], PassResult]


@dataclass(frozen=True)
class PassRecord:
    """What the pass manager saw one pass do."""
    name: str
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    remarks: int

    def __str__(self) -> str:
        what = "changed" if self.changed else "unchanged"
        return (f"{self.name}: {what}, {self.seconds * 1e3:.1f} ms, "
                f"{self.nodes_before} -> {self.nodes_after} nodes, {self.remarks} remarks")
