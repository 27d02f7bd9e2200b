"""The op registry: one definition per op of its kind, shape rule, float64/float32 NumPy
reference, vector-Jacobian rule and FLOP count. Backends add kernels keyed by op name; they never
redefine what an op computes.

Rules, in the style of autodidax's rule tables:
- shape(attrs, *in_shapes) -> list of output shapes (a batch dim may be the symbol "N").
- reference(attrs, *arrays) -> tuple of output arrays, in the inputs' dtype.
- vjp(g, node, *douts) -> one gradient value name (or None) per input; `g` emits nodes.
- flops(attrs, in_shapes, out_shapes) -> floating-point operations for one image.

Every op has a kind (`KINDS`): what sort of computation it is. A pass or a backend that needs a
list of ops asks for the ops of a kind (`ops_of_kind`) instead of writing the list again, so a
new op joins every list its kind belongs to. `inputs` names an op's inputs by role where a pass
or a kernel addresses them by role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import GraphError


KINDS = {
    "conv": "a convolution: output pixels from a window of input pixels and a weight kernel",
    "conv_grad_input": "a convolution's data gradient (itself a convolution, on dy)",
    "conv_grad_filter": "a convolution's weight gradient: a reduction over every pixel",
    "dense": "the fully connected layer of the head",
    "window": "pooling over a window of pixels, and its gradient",
    "channels": "a tensor's channels zero-padded or cropped, pixel by pixel",
    "epilogue": "elementwise on one tensor, reading per-channel vectors or tensors of its shape: "
                "can run as an epilogue step of the kernel that makes the tensor",
    "elementwise": "a chain of epilogue steps on a tensor, as one kernel",
    "norm": "batch normalisation",
    "statistics": "a tensor's batch statistics per channel",
    "norm_grad": "batch normalisation's gradient, whole, or its elementwise half",
    "norm_grad_sums": "batch normalisation's gradient's per-channel sums (its first half)",
    "parameter": "computed from variables alone: a constant between weight loads",
    "loss": "the loss and the weight decay, and their gradients",
    "head_grad": "the dense layer's gradient: small products over the batch",
    "update": "an optimizer update",
    "moving_statistics": "a moving-statistics update",
    "collective": "a reduction over the ranks of a data-parallel job",
}


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    shape: Callable
    reference: Callable
    outputs: tuple[str, ...] = ("out",)
    vjp: Callable | None = None
    flops: Callable | None = None
    inputs: tuple[str, ...] = ()  # role names, where addressed by role
    head: str | None = None  # a fused op: the op it runs with an epilogue on its first output

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


def define(name: str, kind: str, **rules) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    if kind not in KINDS:
        raise ValueError(f"op {name!r}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    OPS[name] = OpDef(name, kind, **rules)
    return OPS[name]


def ops_of_kind(*kinds: str) -> tuple[str, ...]:
    """The ops of these kinds, in definition order."""
    return tuple(name for name, op in OPS.items() if op.kind in kinds)


def kind_of(op: str) -> str:
    return get(op).kind


def epilogue_form(op: str) -> str | None:
    """The op that runs `op` with an epilogue on its first output: the fused op whose head it
    is, or `op` itself when it is such a fused op; None if there is none."""
    if get(op).head:
        return op
    return next((name for name, d in OPS.items() if d.head == op), None)


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
