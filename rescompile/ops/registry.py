"""The op registry: one definition per op of its shape rule, float64/float32 NumPy reference,
vector-Jacobian rule and FLOP count. Backends add kernels keyed by op name; they never redefine
what an op computes.

Rules, in the style of autodidax's rule tables:
- shape(attrs, *in_shapes) -> list of output shapes (a batch dim may be the symbol "N").
- reference(attrs, *arrays) -> tuple of output arrays, in the inputs' dtype.
- vjp(g, node, *douts) -> one gradient value name (or None) per input; `g` emits nodes.
- flops(attrs, in_shapes, out_shapes) -> floating-point operations for one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import GraphError


@dataclass(frozen=True)
class OpDef:
    name: str
    shape: Callable
    reference: Callable
    outputs: tuple[str, ...] = ("out",)
    vjp: Callable | None = None
    flops: Callable | None = None

    def infer(self, attrs: dict, in_values, node_name: str) -> list[tuple]:
        try:
            return [tuple(s) for s in self.shape(attrs, *[v.shape for v in in_values])]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            shapes = ", ".join(str(list(v.shape)) for v in in_values)
            raise GraphError(f"node {node_name!r} ({self.name}): {exc} (input shapes {shapes})") \
                from None

    def output_names(self, attrs: dict, count: int) -> list[str]:
        names = self.outputs(attrs) if callable(self.outputs) else self.outputs
        return list(names)[:count]

    def run_reference(self, attrs: dict, *arrays):
        return self.reference(attrs, *arrays)

    def count_flops(self, attrs: dict, in_shapes, out_shapes) -> float:
        return float(self.flops(attrs, in_shapes, out_shapes)) if self.flops else 0.0


OPS: dict[str, OpDef] = {}


def define(name: str, **rules) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    OPS[name] = OpDef(name, **rules)
    return OPS[name]


def get(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; known: {', '.join(sorted(OPS))}") from None


def per_image(shape) -> tuple:
    """A shape with its batch dimension set to one image."""
    return tuple(1 if d == "N" else d for d in shape)


def numel(shape) -> int:
    n = 1
    for d in per_image(shape):
        n *= d
    return n


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
