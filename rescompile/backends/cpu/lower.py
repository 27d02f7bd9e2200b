"""Lowering: each inference node as one call of a micro-kernel (a `Step`).

A step names the kernel, what each of its pointer arguments points at (a value of the graph,
read as a whole tensor, as the window origin of a padded buffer, or as packed weights), its
constant fields (geometry, the epilogue's scalars) and its iteration space: pixels per image
by channels. Strides of the tensors it touches are left to the arena, which knows where each
value lives. One table maps op names to lowerings; an op missing from it is refused with the
node's name.

Epilogue steps map one to one onto the kernels' epilogue vocabulary (`llvm/epilogue.py`), so
a fused node keeps exactly the steps the passes gave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import GraphError
from ...padding import pads_2d
from .llvm import epilogue
from .llvm.conv import ConvKernel
from .llvm.pixelwise import EltwiseKernel, MaxPoolKernel, MeanKernel
from .target import DTYPE_BYTES, Target


@dataclass(frozen=True)
class Use:
    """How a kernel argument points at a value: "data" (its first element), "window" (the
    top-left corner of a conv's padded window: `pads` before the data), or "packed" (the
    value's weights packed into panels of `nr` channels)."""
    value: str
    how: str = "data"
    pads: tuple[int, int] = (0, 0)  # (top, left) for "window"
    nr: int = 0  # for "packed"


@dataclass
class Step:
    name: str
    op: str
    kernel: object
    uses: dict[str, Use]  # pointer role -> what it points at
    tensors: dict[str, str]  # stride role -> value (x, out, out2, pixel operands)
    fields: dict[str, float | int]
    pixels: int  # output pixels per image
    channels: int
    pixel_align: int = 1
    channel_align: int = 1
    split: str = "pixels"  # how the shared (batch 1) schedule splits it over threads
    flops: float = 0.0  # per image
    pads: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # value -> pads

    @property
    def inputs(self) -> list[str]:
        return [u.value for role, u in self.uses.items() if not role.startswith("out")]

    @property
    def outputs(self) -> list[str]:
        return [u.value for role, u in self.uses.items() if role.startswith("out")]


def image_shape(graph, value: str) -> tuple[int, int, int]:
    """(H, W, C) of one image of a value; [N, C] values are 1 x 1 images."""
    shape = graph.value(value).shape
    return tuple(shape[1:]) if len(shape) == 4 else (1, 1, shape[-1])


def _epilogue_uses(node, steps, first: int) -> tuple[dict, dict, dict]:
    """Pointer uses, pixel tensors and scalar fields of epilogue steps numbered from first."""
    uses, tensors, fields = {}, {}, {}
    for index, step in enumerate(steps, start=first):
        rule = epilogue.rule(step["op"])
        for position, (kind, arg) in enumerate(zip(rule.operands, step["args"])):
            name = epilogue.Operand(index, kind, position).name
            uses[name] = Use(node.inputs[arg])
            if kind == "pixel":
                tensors[name] = node.inputs[arg]
        for scalar in rule.scalars:
            fields[f"s{index}.{scalar}"] = float(step[scalar])
    return uses, tensors, fields


def _split(weight_bytes: int, input_bytes: int) -> str:
    """Shared layers split channels when each thread would otherwise read more weights than
    input (the late, wide layers), else pixels."""
    return "channels" if weight_bytes > input_bytes else "pixels"


# Weights up to this size stay in a core's L2 while every tile passes them (tiles outer); larger
# ones are run panel by panel, so each panel comes from memory once, not once per tile.
WEIGHTS_IN_CACHE_BYTES = 512 * 1024


def conv_step(node, graph, target: Target, dtype: str, x: str, w_shape, epi, out2,
              outputs, stride: int, padding: str) -> Step:
    h, w, cin = image_shape(graph, x)
    k, cout = w_shape[0], w_shape[-1]
    top, bottom, left, right = pads_2d(h, w, k, stride, padding)
    oh, ow = (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1
    kernel = ConvKernel(dtype, target, tuple(s["op"] for s in epi),
                        None if out2 is None else tuple(s["op"] for s in out2))
    uses = {"x": Use(x, "window", (top, left)), "w": Use(node.inputs[1], "packed", nr=kernel.nr)}
    uses["out"] = Use(outputs[0])
    tensors = {"x": x, "out": outputs[0]}
    if out2 is not None:
        uses["out2"] = Use(outputs[1])
        tensors["out2"] = outputs[1]
    weight_bytes = k * k * cin * cout * DTYPE_BYTES[dtype]
    split = _split(weight_bytes, h * w * cin * DTYPE_BYTES[dtype])
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow,
                  panels_outer=int(weight_bytes > WEIGHTS_IN_CACHE_BYTES))
    for steps, first in ((epi, 0), (out2 or [], len(epi))):
        more_uses, more_tensors, more_fields = _epilogue_uses(node, steps, first)
        uses.update(more_uses)
        tensors.update(more_tensors)
        fields.update(more_fields)
    return Step(node.name, node.op, kernel, uses, tensors, fields, oh * ow, cout, kernel.mr,
                kernel.nr, split,
                2.0 * oh * ow * cout * k * k * cin, {x: (top, bottom, left, right)})


def _fused_conv(node, graph, target, dtype):
    attrs = node.attrs
    if attrs.get("stats"):
        raise GraphError(f"node {node.name!r}: batch statistics are a training kernel")
    w_shape = graph.value(node.inputs[1]).shape
    return conv_step(node, graph, target, dtype, node.inputs[0], w_shape, attrs["epilogue"],
                     attrs.get("out2"), node.outputs, attrs["stride"], attrs["padding"])


def _conv(node, graph, target, dtype):
    w_shape = graph.value(node.inputs[1]).shape
    return conv_step(node, graph, target, dtype, node.inputs[0], w_shape, [], None,
                     node.outputs, node.attrs["stride"], node.attrs["padding"])


def _dense(node, graph, target, dtype):
    """x [N, C] @ w [C, K] + b: a 1x1 conv over 1x1 images with a bias epilogue."""
    c, k = graph.value(node.inputs[1]).shape
    step = conv_step(node, graph, target, dtype, node.inputs[0], (1, 1, c, k),
                     [{"op": "bias_add", "args": [2]}], None, node.outputs, 1, "same")
    step.split = "channels"
    return step


def eltwise_step(node, graph, target, dtype, steps, out2) -> Step:
    kernel = EltwiseKernel(dtype, target, tuple(s["op"] for s in steps),
                           None if out2 is None else tuple(s["op"] for s in out2))
    h, w, c = image_shape(graph, node.inputs[0])
    uses = {"x": Use(node.inputs[0]), "out": Use(node.outputs[0])}
    tensors = {"x": node.inputs[0], "out": node.outputs[0]}
    if out2 is not None:
        uses["out2"] = Use(node.outputs[1])
        tensors["out2"] = node.outputs[1]
    fields = dict(oh=h, ow=w)
    for chain, first in ((steps, 0), (out2 or [], len(steps))):
        more_uses, more_tensors, more_fields = _epilogue_uses(node, chain, first)
        uses.update(more_uses)
        tensors.update(more_tensors)
        fields.update(more_fields)
    return Step(node.name, node.op, kernel, uses, tensors, fields, h * w, c,
                channel_align=kernel.lanes, split=_pixel_split(h * w))


def _pixel_split(pixels: int) -> str:
    return "pixels" if pixels >= 16 else "channels"


def _fused_eltwise(node, graph, target, dtype):
    return eltwise_step(node, graph, target, dtype, node.attrs["epilogue"],
                        node.attrs.get("out2"))


def _single(op: str, arg_count: int):
    """A core elementwise op: its first input flows through one epilogue step of its own."""
    def lower(node, graph, target, dtype):
        step = {"op": op, "args": list(range(1, 1 + arg_count)), **node.attrs}
        return eltwise_step(node, graph, target, dtype, [step], None)
    return lower


def _batch_norm(node, graph, target, dtype):
    if node.attrs["training"]:
        raise GraphError(f"node {node.name!r}: train-mode batch_norm is a training kernel")
    step = {"op": "batch_normalize", "args": [1, 2, 3, 4], "epsilon": node.attrs["epsilon"]}
    return eltwise_step(node, graph, target, dtype, [step], None)


def _max_pool(node, graph, target, dtype):
    h, w, c = image_shape(graph, node.inputs[0])
    oh, ow, _ = image_shape(graph, node.outputs[0])
    k, s = node.attrs["k"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, w, k, s, node.attrs["padding"])
    kernel = MaxPoolKernel(dtype, target)
    fields = dict(k=k, stride=s, pad_top=top, pad_left=left, h=h, w=w, oh=oh, ow=ow)
    return Step(node.name, node.op, kernel, {"x": Use(node.inputs[0]), "out": Use(node.outputs[0])},
                {"x": node.inputs[0], "out": node.outputs[0]}, fields, oh * ow, c,
                channel_align=kernel.lanes, split=_pixel_split(oh * ow))


def _mean(node, graph, target, dtype):
    h, w, c = image_shape(graph, node.inputs[0])
    kernel = MeanKernel(dtype, target)
    return Step(node.name, node.op, kernel, {"x": Use(node.inputs[0]), "out": Use(node.outputs[0])},
                {"x": node.inputs[0], "out": node.outputs[0]}, dict(h=h, w=w), 1, c,
                channel_align=kernel.lanes, split="channels")


def copy_step(name: str, source: str, target_value: str, graph, target: Target,
              dtype: str) -> Step:
    """A plain copy (the fed images into the interior of a padded buffer)."""
    kernel = EltwiseKernel(dtype, target)
    h, w, c = image_shape(graph, source)
    return Step(name, "copy", kernel, {"x": Use(source), "out": Use(target_value)},
                {"x": source, "out": target_value}, dict(oh=h, ow=w), h * w, c,
                channel_align=kernel.lanes, split=_pixel_split(h * w))


LOWERINGS = {
    "fused_conv2d": _fused_conv,
    "conv2d": _conv,
    "dense": _dense,
    "fused_elementwise": _fused_eltwise,
    "relu": _single("relu", 0),
    "add": _single("add", 1),
    "affine": _single("affine", 2),
    "bias_add": _single("bias_add", 1),
    "batch_normalize": _single("batch_normalize", 4),
    "batch_norm": _batch_norm,
    "max_pool": _max_pool,
    "global_avg_pool": _mean,
}


def lower_node(node, graph, target: Target, dtype: str) -> Step:
    lowering = LOWERINGS.get(node.op)
    if lowering is None:
        raise GraphError(f"node {node.name!r}: the cpu backend has no kernel for op "
                         f"{node.op!r}")
    return lowering(node, graph, target, dtype)


def value_bytes(graph, value: str, dtype: str, pads=(0, 0, 0, 0)) -> int:
    """Bytes of one image of a value, with a zero border of `pads`."""
    h, w, c = image_shape(graph, value)
    top, bottom, left, right = pads
    return (h + top + bottom) * (w + left + right) * c * DTYPE_BYTES[dtype]
