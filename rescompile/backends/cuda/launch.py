"""What a plan is made of: references to device buffers and kernel launches.

Lowering a node yields Launches. A Launch names its kernel by generated source (identical
sources share one compiled kernel) and its arguments by Ref, resolved to flat device arrays
when the plan is bound to memory. Nothing here touches a device, so plans (and launch counts)
can be made on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...ops.registry import numel


@dataclass(frozen=True)
class Ref:
    kind: str  # "value" (a graph value), "scratch" (node-private, as lowered; the plan turns
    #            it into a "region" of a scratch pool), "region" (slice of an arena or pool)
    name: str
    offset: int = 0
    size: int = 0


@dataclass(frozen=True)
class Launch:
    node: str
    source: str
    grid: tuple
    block: tuple
    args: tuple[Ref, ...]


@dataclass
class Context:
    """What lowering a node may ask: concrete shapes, dtypes, launch sizes, scratch space."""
    graph: object
    batch: int | None
    dtype: str
    target: object
    scratch: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (size, dtype)

    def shape(self, value: str) -> tuple:
        return self.graph.value(value).concrete_shape(self.batch)

    def size(self, value: str) -> int:
        return numel(self.shape(value))

    def temp(self, node, tag: str, size: int, dtype: str | None = None) -> Ref:
        name = f"{node.name}#{tag}"
        self.scratch[name] = (size, dtype or self.dtype)
        return Ref("scratch", name, 0, size)


def value(name: str) -> Ref:
    return Ref("value", name)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_launch(ctx: Context, node_name: str, source: str, size: int, args) -> Launch:
    """A 1-D launch for a grid-stride loop over `size` items."""
    t = ctx.target
    return Launch(node_name, source, (max(1, min(t.max_blocks, cdiv(size, t.block))),),
                  (t.block,), tuple(args))
