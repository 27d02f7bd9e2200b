"""Lowering: each node as calls of micro-kernels (`Step`s), or as a host step.

A step names the kernel, what each of its pointer arguments points at (a value of the graph or
one the backend makes, read as a whole tensor, as the window origin of a padded buffer, or as
packed weights), which of them it writes, its constant fields (geometry, the epilogue's
scalars; a field may be a function of the batch size) and its iteration space: pixels per image
by channels. Strides of the tensors it touches are left to the arena, which knows where each
value lives. One table maps op names to lowerings; an op missing from it is refused with the
node's name.

Epilogue steps map one to one onto the kernels' epilogue vocabulary (`llvm/epilogue.py`), so a
fused node keeps exactly the steps the passes gave it.

Training adds the gradient kernels:
- a conv's data gradient is the forward tile on dy with the weights rotated and transposed;
  with a stride, dy is first copied into a zero buffer at every stride-th pixel (a "dilated"
  buffer), so every data gradient is one stride-1 convolution;
- a conv's weight gradient is the weight-gradient tile into float64 slots, then their sum;
- batch statistics come from the producing conv's kernel (or a sums kernel), and the
  batch-norm gradient is its two sums into slots, their sum, and the elementwise apply.
Every reduction runs in fixed chunks of pixels (REDUCE_CHUNK, WGRAD_CHUNK), one slot each, so
no result depends on the number of threads.

The classifier head's gradient, the loss, weight decay and the optimizer and moving-average
updates are a few small tensors: they run as host steps, the ops' own NumPy definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...errors import GraphError, UsageError
from ...padding import pads_2d
from .llvm import epilogue
from .llvm.conv import ConvKernel
from .llvm.pixelwise import (EltwiseKernel, MaxPoolGradKernel, MaxPoolKernel, MeanGradKernel,
                             MeanKernel)
from .llvm.reduce import BatchNormGradApply, ChannelSums, SlotSum
from .llvm.wgrad import WgradKernel
from .target import DTYPE_BYTES, Target

REDUCE_CHUNK = 3072  # pixels per slot of batch statistics and batch-norm gradient sums
WGRAD_CHUNK = 2048  # pixels per slot of a weight gradient
WGRAD_GROUPS = 4  # a weight gradient's output channels in up to this many calls per chunk
# Weights up to this size stay in a core's L2 while every tile passes them (tiles outer); larger
# ones are run panel by panel, so each panel comes from memory once, not once per tile.
WEIGHTS_IN_CACHE_BYTES = 512 * 1024
HOST_OPS = ("softmax_cross_entropy", "softmax_cross_entropy_grad", "l2_penalty",
            "l2_penalty_grad", "matmul", "sum_rows", "momentum_update", "sgd_update",
            "moving_average", "debiased_moving_average",
            "nesterov_update", "smooth_labels")


@dataclass(frozen=True)
class Use:
    """How a kernel argument points at a value: "data" (its first element), "window" (the
    top-left corner of a conv's padded window: `pads` before the data), or "packed" (the
    value's weights packed into panels of `nr` channels; `transform` "dgrad" rotates and
    transposes them for a data gradient)."""
    value: str
    how: str = "data"
    pads: tuple[int, int] = (0, 0)  # (top, left) for "window"
    nr: int = 0  # for "packed"
    transform: str = ""


@dataclass(frozen=True)
class Slots:
    """A float64 partial-sum buffer: one slot of `slot_bytes` per chunk of `chunk` pixels of
    `pixels` per image."""
    slot_bytes: int
    pixels: int
    chunk: int

    def count(self, images: int) -> int:
        return -(-images * self.pixels // self.chunk)


@dataclass
class Step:
    name: str
    op: str
    kernel: object
    uses: dict[str, Use]  # pointer role -> what it points at
    writes: tuple[str, ...]  # the roles it writes
    tensors: dict[str, str]  # stride role -> value (x, out, out2, pixel operands)
    fields: dict[str, float | int | Callable]  # a callable takes the batch size
    pixels: int  # output pixels per image (all of them if not `batched`)
    channels: int
    pixel_align: int = 1
    channel_align: int = 1
    split: str = "pixels"  # how a shared step is cut: "pixels", "channels" or "both"
    flops: float = 0.0  # per image
    pads: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # value -> pads
    fixed_chunk: int = 0  # a reduction: one call per chunk of this many pixels
    groups: int = 1  # split "both": channel groups per chunk of pixels
    batched: bool = True  # False: one pass over `pixels`, whatever the batch
    stride_scale: dict[str, int] = field(default_factory=dict)  # role -> stride multiplier
    made: dict[str, tuple] = field(default_factory=dict)  # backend-made tensor -> (H, W, C)
    dilated: tuple[str, ...] = ()  # made tensors written at every stride-th pixel only
    slots: dict[str, Slots] = field(default_factory=dict)  # backend-made slot buffers
    origin: str = ""  # the node it lowers

    @property
    def inputs(self) -> list[str]:
        return [u.value for role, u in self.uses.items() if role not in self.writes]

    @property
    def outputs(self) -> list[str]:
        return [self.uses[role].value for role in self.writes]


@dataclass
class HostStep:
    """A node run with its op's NumPy definition (small tensors of the head and the update)."""
    node: object

    name = property(lambda s: s.node.name)
    origin = property(lambda s: s.node.name)
    op = property(lambda s: s.node.op)
    inputs = property(lambda s: list(s.node.inputs))
    outputs = property(lambda s: list(s.node.outputs))
    flops = 0.0


def image_shape(graph, value: str) -> tuple[int, int, int]:
    """(H, W, C) of one image of a value; [N, C] values are 1 x 1 images."""
    shape = graph.value(value).shape
    return tuple(shape[1:]) if len(shape) == 4 else (1, 1, shape[-1])


def batched(graph, value: str) -> bool:
    shape = graph.value(value).shape
    return bool(shape) and shape[0] == "N"


def _epilogue_uses(inputs, steps, first: int) -> tuple[dict, dict, dict]:
    """Pointer uses, pixel tensors and scalar fields of epilogue steps numbered from first;
    a step's args index `inputs`."""
    uses, tensors, fields = {}, {}, {}
    for index, step in enumerate(steps, start=first):
        rule = epilogue.rule(step["op"])
        for position, (kind, arg) in enumerate(zip(rule.operands, step["args"])):
            name = epilogue.Operand(index, kind, position).name
            uses[name] = Use(inputs[arg])
            if kind == "pixel":
                tensors[name] = inputs[arg]
        for scalar in rule.scalars:
            fields[f"s{index}.{scalar}"] = float(step[scalar])
    return uses, tensors, fields


def _split(weight_bytes: int, input_bytes: int) -> str:
    """Shared layers split channels when each thread would otherwise read more weights than
    input (the late, wide layers), else pixels."""
    return "channels" if weight_bytes > input_bytes else "pixels"


# -- convolutions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvGeometry:
    shape: tuple[int, int, int]  # (H, W, C) of the input's image
    k: int
    cout: int
    stride: int
    pads: tuple[int, int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        h, w, _ = self.shape
        top, bottom, left, right = self.pads
        return ((h + top + bottom - self.k) // self.stride + 1,
                (w + left + right - self.k) // self.stride + 1)


@dataclass(frozen=True)
class Sums:
    """Per-channel sums a conv makes of its output (`reduce.ChannelSums` kinds) into the slot
    buffer `partial`; a batch-norm gradient's read its batch norm's `operands` (x, gamma, ...)
    and `attrs` (epsilon, alpha)."""
    kind: str
    partial: str
    operands: tuple = ()  # (role, value) pairs
    attrs: tuple = ()  # (name, value) pairs


def conv_step(node, dtype: str, target: Target, x: str, weights: Use, geometry: ConvGeometry,
              outputs, epi=(), out2=None, sums: Sums | None = None, inputs=None) -> Step:
    """A convolution step: x through the packed weights into outputs (and out2), with the
    epilogue (whose args index `inputs`, the node's by default), and with `sums` of its
    output."""
    inputs = list(inputs or node.inputs)
    h, w, cin = geometry.shape
    k, cout, stride = geometry.k, geometry.cout, geometry.stride
    top, bottom, left, right = geometry.pads
    oh, ow = geometry.out_hw
    kernel = ConvKernel(dtype, target, tuple(s["op"] for s in epi),
                        None if out2 is None else tuple(s["op"] for s in out2),
                        sums=sums.kind if sums else None)
    weights = Use(weights.value, "packed", nr=kernel.nr, transform=weights.transform)
    uses = {"x": Use(x, "window", (top, left)), "w": weights, "out": Use(outputs[0])}
    tensors, writes = {"x": x, "out": outputs[0]}, ["out"]
    if out2 is not None:
        uses["out2"] = Use(outputs[1])
        tensors["out2"] = outputs[1]
        writes.append("out2")
    size = DTYPE_BYTES[dtype]
    weight_bytes = k * k * cin * cout * size
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow,
                  panels_outer=int(weight_bytes > WEIGHTS_IN_CACHE_BYTES))
    for steps, first in ((list(epi), 0), (list(out2 or []), len(epi))):
        more_uses, more_tensors, more_fields = _epilogue_uses(inputs, steps, first)
        uses.update(more_uses)
        tensors.update(more_tensors)
        fields.update(more_fields)
    step = Step(node.name, node.op, kernel, uses, (), tensors, fields, oh * ow, cout,
                kernel.mr, kernel.nr, _split(weight_bytes, h * w * cin * size),
                2.0 * oh * ow * cout * k * k * cin, {x: geometry.pads})
    if sums is not None:
        for role, value in sums.operands:
            uses[f"sums.{role}"] = Use(value)
            if role == "x":
                tensors["sums.x"] = value
        uses["sums"] = Use(sums.partial)
        writes.append("sums")
        fields.update({f"sums.{n}": float(v) for n, v in sums.attrs})
        fields.update({"sums.chunk": REDUCE_CHUNK, "sums.width": cout})
        step.slots[sums.partial] = Slots(16 * cout, oh * ow, REDUCE_CHUNK)
        step.split, step.fixed_chunk = "pixels", REDUCE_CHUNK
    step.writes = tuple(writes)
    return step


def _forward_geometry(graph, x, w_shape, attrs) -> ConvGeometry:
    h, w, cin = image_shape(graph, x)
    k, stride = w_shape[0], attrs["stride"]
    return ConvGeometry((h, w, cin), k, w_shape[-1], stride,
                        pads_2d(h, w, k, stride, attrs["padding"]))


def _fused_conv(node, graph, target, dtype):
    attrs, x = node.attrs, node.inputs[0]
    geometry = _forward_geometry(graph, x, graph.value(node.inputs[1]).shape, attrs)
    outs = list(node.outputs)
    if not attrs.get("stats"):
        return [conv_step(node, dtype, target, x, Use(node.inputs[1]), geometry, outs,
                          attrs["epilogue"], attrs.get("out2"))]
    partial = f"{node.name}:stats"
    conv = conv_step(node, dtype, target, x, Use(node.inputs[1]), geometry, outs[:-2],
                     attrs["epilogue"], attrs.get("out2"), Sums("moments", partial))
    return [conv, slot_sum(f"{node.name}/stats", partial, conv.slots[partial], outs[-2:],
                           geometry.cout, "moments", dtype, target)]


def _conv(node, graph, target, dtype):
    geometry = _forward_geometry(graph, node.inputs[0], graph.value(node.inputs[1]).shape,
                                 node.attrs)
    return [conv_step(node, dtype, target, node.inputs[0], Use(node.inputs[1]), geometry,
                      list(node.outputs))]


def _dense(node, graph, target, dtype):
    """x [N, C] @ w [C, K] + b: a 1x1 conv over 1x1 images with a bias epilogue."""
    c, k = graph.value(node.inputs[1]).shape
    step = conv_step(node, dtype, target, node.inputs[0], Use(node.inputs[1]),
                     ConvGeometry((1, 1, c), 1, k, 1, (0, 0, 0, 0)), list(node.outputs),
                     [{"op": "bias_add", "args": [2]}])
    step.split = "channels"
    return [step]


def _grad_input(node, graph, target, dtype, plus=None, sums=None, outputs=None):
    """dx = the forward tile on dy, padded by k - 1 - pad (and dilated by the stride), with
    the weights rotated by 180 degrees and input and output channels swapped; `plus` another
    gradient added in the epilogue (then `outputs` are the add's), `sums` a batch-norm
    gradient's sums of the result."""
    dy, w = node.inputs
    k, cin = graph.value(w).shape[0], graph.value(w).shape[2]
    h, wd = node.attrs["in_hw"]
    stride = node.attrs["stride"]
    top, _, left, _ = pads_2d(h, wd, k, stride, node.attrs["padding"])
    oh, ow, cout = image_shape(graph, dy)
    hd, wdd = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    pads = (k - 1 - top, h + top - hd, k - 1 - left, wd + left - wdd)
    if min(pads) < 0:
        raise GraphError(f"node {node.name!r}: no data-gradient padding for this geometry")
    steps, source = [], dy
    if stride > 1:
        source = f"{dy}:dilated{stride}"
        copy = copy_step(f"{node.name}/dilate", dy, source, (oh, ow, cout), target, dtype)
        copy.stride_scale = {"out": stride}
        copy.made[source] = (hd, wdd, cout)
        copy.dilated = (source,)
        steps.append(copy)
    geometry = ConvGeometry((hd, wdd, cout), k, cin, 1, pads)
    epi = [{"op": "add", "args": [2]}] if plus else []
    steps.append(conv_step(node, dtype, target, source, Use(w, transform="dgrad"), geometry,
                           list(outputs or node.outputs), epi, sums=sums,
                           inputs=[dy, w] + ([plus] if plus else [])))
    return steps


def _grad_filter(node, graph, target, dtype):
    """dW from the weight-gradient tile, chunk by chunk into float64 slots, then their sum."""
    x, dy = node.inputs
    k, stride = node.attrs["k"], node.attrs["stride"]
    h, w, cin = image_shape(graph, x)
    oh, ow, cout = image_shape(graph, dy)
    pads = pads_2d(h, w, k, stride, node.attrs["padding"])
    kernel = WgradKernel(dtype, target)
    partial = f"{node.name}:partial"
    slots = Slots(8 * k * k * cin * cout, oh * ow, WGRAD_CHUNK)
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow, chunk=WGRAD_CHUNK,
                  width=cout)
    uses = {"x": Use(x, "window", pads[::2]), "dy": Use(dy), "partial": Use(partial)}
    groups = min(-(-cout // kernel.nr), WGRAD_GROUPS)
    step = Step(node.name, node.op, kernel, uses, ("partial",), {"x": x, "dy": dy}, fields,
                oh * ow, cout, 1, kernel.nr, "both", 2.0 * oh * ow * cout * k * k * cin,
                {x: pads}, fixed_chunk=WGRAD_CHUNK, groups=groups, slots={partial: slots})
    total = k * k * cin * cout
    return [step, slot_sum(f"{node.name}/sum", partial, slots, list(node.outputs), total,
                           "sums", dtype, target, rows=1)]


def slot_sum(name: str, partial: str, slots: Slots, outputs, width: int, mode: str,
             dtype: str, target: Target, rows: int = 2) -> Step:
    kernel = SlotSum(dtype, target, rows, mode)
    uses = {"partial": Use(partial)}
    uses.update({f"out{r}": Use(v) for r, v in enumerate(outputs)})
    fields = dict(slots=slots.count, width=width, images=lambda n: n, pixels=slots.pixels)
    return Step(name, "slot_sum", kernel, uses, tuple(f"out{r}" for r in range(rows)), {},
                fields, 1, width, split="channels", batched=False)


# -- batch norm -----------------------------------------------------------------------------

def channel_sums(name: str, kind: str, node_inputs: dict, shape, partial: str, attrs,
                 dtype: str, target: Target) -> Step:
    """Two per-channel sums of `kind` over a tensor of image `shape`, into slot buffer
    `partial`."""
    h, w, c = shape
    kernel = ChannelSums(dtype, target, kind)
    uses = {role: Use(value) for role, value in node_inputs.items()}
    uses["partial"] = Use(partial)
    tensors = {role: v for role, v in node_inputs.items() if role in ("x", "dr")}
    fields = dict(oh=h, ow=w, chunk=REDUCE_CHUNK, width=c,
                  **{n: float(attrs[n]) for n in ("epsilon", "alpha") if n in attrs})
    return Step(name, kind, kernel, uses, ("partial",), tensors, fields, h * w, c, 1,
                kernel.lanes, "pixels", fixed_chunk=REDUCE_CHUNK,
                slots={partial: Slots(16 * c, h * w, REDUCE_CHUNK)})


def _moments(node, graph, target, dtype, x=None, outputs=None):
    x = x or node.inputs[0]
    shape = image_shape(graph, x)
    partial = f"{node.name}:moments"
    sums = channel_sums(node.name, "moments", {"x": x}, shape, partial, {}, dtype, target)
    return [sums, slot_sum(f"{node.name}/combine", partial, sums.slots[partial],
                           outputs or list(node.outputs), shape[2], "moments", dtype, target)]


def _batch_norm_train(node, graph, target, dtype):
    """Unfused (optimize=False): the moments, then normalise with them."""
    if node.attrs.get("sync"):
        raise UsageError(f"node {node.name!r}: a synchronised batch norm runs on the cpu "
                         f"backend split into its halves (compile with optimize=True)")
    x, gamma, beta = node.inputs
    y, mean, var = node.outputs
    steps = _moments(node, graph, target, dtype, x, [mean, var])
    normalize = {"op": "batch_normalize", "args": [1, 2, 3, 4], "epsilon": node.attrs["epsilon"]}
    steps.append(eltwise_step(node, graph, target, dtype, [normalize], None,
                              inputs=[x, gamma, beta, mean, var], outputs=[y]))
    return steps


def _bn_grad_inputs(node, relu: bool) -> dict:
    names = (["dr", "x", "gamma", "beta", "mean", "var"] if relu
             else ["dr", "x", "gamma", "mean", "var"])
    return dict(zip(names, node.inputs))


def bn_grad_sums(node, relu: bool) -> Sums:
    """The sums a batch-norm gradient needs, for its producer's kernel to make."""
    operands = tuple((r, v) for r, v in _bn_grad_inputs(node, relu).items() if r != "dr")
    attrs = tuple((n, node.attrs[n]) for n in ("epsilon", "alpha") if n in node.attrs)
    return Sums("bn_relu_grad" if relu else "bn_grad", f"{node.name}:sums", operands, attrs)


def _batch_norm_grad(relu: bool):
    def lower(node, graph, target, dtype, summed=False, plus=None, outputs=None):
        """With `summed`, the sums come from the producer of dr (`bn_grad_sums`); `plus`
        another gradient added to dx (then `outputs` end with the add's)."""
        inputs = _bn_grad_inputs(node, relu)
        dx, dgamma, dbeta = list(outputs or node.outputs)
        steps = _bn_grad_sum_steps(node, graph, target, dtype, relu, inputs, dgamma, dbeta,
                                   summed)
        return steps + [_bn_grad_apply_step(node, graph, target, dtype, relu, inputs, dx,
                                            dgamma, dbeta, plus)]
    return lower


def _bn_grad_sum_steps(node, graph, target, dtype, relu, inputs, dgamma, dbeta, summed):
    shape = image_shape(graph, inputs["x"])
    sums = bn_grad_sums(node, relu)
    slots = Slots(16 * shape[2], shape[0] * shape[1], REDUCE_CHUNK)
    steps = [] if summed else [channel_sums(node.name, sums.kind, inputs, shape,
                                            sums.partial, node.attrs, dtype, target)]
    steps.append(slot_sum(f"{node.name}/combine", sums.partial, slots, [dbeta, dgamma],
                          shape[2], "sums", dtype, target))
    return steps


def _bn_grad_apply_step(node, graph, target, dtype, relu, inputs, dx, dgamma, dbeta, plus):
    shape = image_shape(graph, inputs["x"])
    kernel = BatchNormGradApply(dtype, target, relu, plus is not None)
    uses = {role: Use(v) for role, v in inputs.items()}
    uses.update(dgamma=Use(dgamma), dbeta=Use(dbeta), out=Use(dx))
    tensors = {"dr": inputs["dr"], "x": inputs["x"], "out": dx}
    if plus is not None:
        uses["plus"] = Use(plus)
        tensors["plus"] = plus
    fields = dict(oh=shape[0], ow=shape[1], images=lambda n: n,
                  **{n: float(node.attrs[n]) for n in ("epsilon", "alpha") if n in node.attrs})
    return Step(f"{node.name}/apply", node.op, kernel, uses, ("out",), tensors, fields,
                shape[0] * shape[1], shape[2], channel_align=kernel.lanes,
                split=_pixel_split(shape[0] * shape[1]))


def _split_bn_grad_sums(node, graph, target, dtype):
    """A synchronised batch norm's gradient, first half: this rank's two sums."""
    inputs = _bn_grad_inputs(node, relu=False)
    dgamma, dbeta = node.outputs
    return _bn_grad_sum_steps(node, graph, target, dtype, False, inputs, dgamma, dbeta, False)


def _split_bn_grad_apply(node, graph, target, dtype):
    """Second half: dx from the sums averaged over the ranks."""
    dr, x, gamma, mean, var, dgamma, dbeta = node.inputs
    inputs = {"dr": dr, "x": x, "gamma": gamma, "mean": mean, "var": var}
    return [_bn_grad_apply_step(node, graph, target, dtype, False, inputs, node.outputs[0],
                                dgamma, dbeta, None)]


def _batch_norm(node, graph, target, dtype):
    if node.attrs["training"]:
        return _batch_norm_train(node, graph, target, dtype)
    step = {"op": "batch_normalize", "args": [1, 2, 3, 4], "epsilon": node.attrs["epsilon"]}
    return [eltwise_step(node, graph, target, dtype, [step], None)]


# -- elementwise, pooling, copies ----------------------------------------------------------

def eltwise_step(node, graph, target, dtype, steps, out2, inputs=None, outputs=None) -> Step:
    inputs, outputs = list(inputs or node.inputs), list(outputs or node.outputs)
    kernel = EltwiseKernel(dtype, target, tuple(s["op"] for s in steps),
                           None if out2 is None else tuple(s["op"] for s in out2))
    h, w, c = image_shape(graph, inputs[0])
    uses = {"x": Use(inputs[0]), "out": Use(outputs[0])}
    tensors, writes = {"x": inputs[0], "out": outputs[0]}, ["out"]
    if out2 is not None:
        uses["out2"] = Use(outputs[1])
        tensors["out2"] = outputs[1]
        writes.append("out2")
    fields = dict(oh=h, ow=w)
    for chain, first in ((steps, 0), (out2 or [], len(steps))):
        more_uses, more_tensors, more_fields = _epilogue_uses(inputs, chain, first)
        uses.update(more_uses)
        tensors.update(more_tensors)
        fields.update(more_fields)
    return Step(node.name, node.op, kernel, uses, tuple(writes), tensors, fields, h * w, c,
                channel_align=kernel.lanes, split=_pixel_split(h * w))


def _pixel_split(pixels: int) -> str:
    return "pixels" if pixels >= 16 else "channels"


def _fused_eltwise(node, graph, target, dtype):
    attrs = node.attrs
    if attrs.get("stats"):
        y = node.outputs[0]
        steps = [eltwise_step(node, graph, target, dtype, attrs["epilogue"], attrs.get("out2"),
                              outputs=node.outputs[:-2])]
        return steps + _moments(node, graph, target, dtype, y, list(node.outputs[-2:]))
    return [eltwise_step(node, graph, target, dtype, attrs["epilogue"], attrs.get("out2"))]


def _single(op: str, arg_count: int):
    """A core elementwise op: its first input flows through one epilogue step of its own."""
    def lower(node, graph, target, dtype):
        step = {"op": op, "args": list(range(1, 1 + arg_count)), **node.attrs}
        return [eltwise_step(node, graph, target, dtype, [step], None)]
    return lower


def _pool_fields(node, graph, x):
    h, w, c = image_shape(graph, x)
    k, s = node.attrs["k"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, w, k, s, node.attrs["padding"])
    return h, w, c, dict(k=k, stride=s, pad_top=top, pad_left=left, h=h, w=w)


def _max_pool(node, graph, target, dtype):
    h, w, c, fields = _pool_fields(node, graph, node.inputs[0])
    oh, ow, _ = image_shape(graph, node.outputs[0])
    kernel = MaxPoolKernel(dtype, target)
    return [Step(node.name, node.op, kernel, {"x": Use(node.inputs[0]),
                                              "out": Use(node.outputs[0])}, ("out",),
                 {"x": node.inputs[0], "out": node.outputs[0]}, dict(fields, oh=oh, ow=ow),
                 oh * ow, c, channel_align=kernel.lanes, split=_pixel_split(oh * ow))]


def _max_pool_grad(node, graph, target, dtype):
    dy, x = node.inputs
    h, w, c, fields = _pool_fields(node, graph, x)
    oh, ow, _ = image_shape(graph, dy)
    kernel = MaxPoolGradKernel(dtype, target)
    return [Step(node.name, node.op, kernel, {"dy": Use(dy), "x": Use(x),
                                              "out": Use(node.outputs[0])}, ("out",),
                 {"dy": dy, "x": x, "out": node.outputs[0]}, dict(fields, oh=oh, ow=ow),
                 h * w, c, channel_align=kernel.lanes, split=_pixel_split(h * w))]


def _mean(node, graph, target, dtype):
    h, w, c = image_shape(graph, node.inputs[0])
    kernel = MeanKernel(dtype, target)
    return [Step(node.name, node.op, kernel, {"x": Use(node.inputs[0]),
                                              "out": Use(node.outputs[0])}, ("out",),
                 {"x": node.inputs[0], "out": node.outputs[0]}, dict(h=h, w=w), 1, c,
                 channel_align=kernel.lanes, split="channels")]


def _mean_grad(node, graph, target, dtype):
    h, w, c = image_shape(graph, node.outputs[0])
    kernel = MeanGradKernel(dtype, target)
    return [Step(node.name, node.op, kernel, {"dy": Use(node.inputs[0]),
                                              "out": Use(node.outputs[0])}, ("out",),
                 {"dy": node.inputs[0], "out": node.outputs[0]}, dict(oh=h, ow=w), h * w, c,
                 channel_align=kernel.lanes, split=_pixel_split(h * w))]


def copy_step(name: str, source: str, target_value: str, shape, target: Target,
              dtype: str) -> Step:
    """A plain copy of `source` (images of `shape`) into another layout: the fed images into
    the interior of a padded buffer, dy into a dilated one."""
    kernel = EltwiseKernel(dtype, target)
    h, w, c = shape
    return Step(name, "copy", kernel, {"x": Use(source), "out": Use(target_value)}, ("out",),
                {"x": source, "out": target_value}, dict(oh=h, ow=w), h * w, c,
                channel_align=kernel.lanes, split=_pixel_split(h * w))


LOWERINGS = {
    "fused_conv2d": _fused_conv,
    "conv2d": _conv,
    "dense": _dense,
    "fused_elementwise": _fused_eltwise,
    "relu": _single("relu", 0),
    "relu_grad": _single("relu_grad", 1),
    "add": _single("add", 1),
    "affine": _single("affine", 2),
    "bias_add": _single("bias_add", 1),
    "batch_normalize": _single("batch_normalize", 4),
    "batch_norm": _batch_norm,
    "batch_moments": _moments,
    "batch_norm_grad": _batch_norm_grad(relu=False),
    "batch_norm_relu_grad": _batch_norm_grad(relu=True),
    "batch_norm_grad_sums": _split_bn_grad_sums,
    "batch_norm_grad_apply": _split_bn_grad_apply,
    "conv2d_grad_input": _grad_input,
    "conv2d_grad_filter": _grad_filter,
    "max_pool": _max_pool,
    "max_pool_grad": _max_pool_grad,
    "global_avg_pool": _mean,
    "global_avg_pool_grad": _mean_grad,
}


def is_host(node, graph) -> bool:
    return node.op in HOST_OPS or not any(batched(graph, v) for v in node.inputs + node.outputs)


def lower_node(node, graph, target: Target, dtype: str, **fused) -> list:
    """The node's steps; a host step for the small ops of the head, the loss and the updates,
    and for any node with no per-image tensor. `fused` passes a kernel fusion's arguments."""
    if is_host(node, graph):
        return [HostStep(node)]
    lowering = LOWERINGS.get(node.op)
    if lowering is None:
        raise GraphError(f"node {node.name!r}: the cpu backend has no kernel for op "
                         f"{node.op!r}")
    steps = lowering(node, graph, target, dtype, **fused)
    for step in steps:
        step.origin = node.name
    return steps


BN_GRADS = {"batch_norm_grad": False, "batch_norm_relu_grad": True}  # op -> its relu
ADD_PRODUCERS = ("conv2d_grad_input", *BN_GRADS)


def lower_nodes(nodes, graph, target: Target, dtype: str, kept=frozenset()):
    """Every node's steps, with two fusions of gradients into the kernels that make them
    (each reported):
    - a gradient add whose operand only it reads, made by a data gradient or a batch-norm
      gradient, runs in that kernel (its epilogue, the apply's `plus`), at the add's place;
    - a batch-norm gradient whose dr is a data gradient's (or such an add's) only use takes
      its two sums from that conv's epilogue, which reads the gradient in registers.
    `kept` values (fetched) are never fused away."""
    position = {n.name: i for i, n in enumerate(nodes)}
    producer = {v: n for n in nodes for v in n.outputs}
    consumers = graph.consumers()
    adds, remarks = {}, []  # producer name -> (add node, the other operand)
    for node in nodes:
        if node.op != "add" or is_host(node, graph):
            continue
        for made, other in (node.inputs, node.inputs[::-1]):
            source = producer.get(made)
            if (source is not None and source.op in ADD_PRODUCERS
                    and source.outputs[0] == made and source.name not in adds
                    and [u.name for u in consumers[made]] == [node.name] and made not in kept
                    and _untouched_between(source, node, nodes, position, consumers)):
                adds[source.name] = (node, other)
                remarks.append((node.name, f"runs in {source.name}'s kernel"))
                break
    absorbed = {add.name: name for name, (add, _) in adds.items()}
    summed = {}  # batch-norm gradient name -> the data gradient making its sums
    for node in nodes:
        if node.op != "conv2d_grad_input":
            continue
        out = adds[node.name][0].outputs[0] if node.name in adds else node.outputs[0]
        users = consumers[out]
        if (len(users) == 1 and users[0].op in BN_GRADS and users[0].inputs[0] == out
                and out not in kept and users[0].name in position):
            summed[users[0].name] = node.name
            remarks.append((users[0].name, f"its sums come from {node.name}'s epilogue"))
    steps = []
    for node in nodes:
        if node.name in adds:
            continue  # lowered at its add's place
        if node.name in absorbed:
            producer_node = next(n for n in nodes if n.name == absorbed[node.name])
            add, other = adds[producer_node.name]
            node, extra = producer_node, dict(plus=other, outputs=add.outputs +
                                              producer_node.outputs[1:])
        else:
            extra = {}
        if node.op == "conv2d_grad_input":
            bn = next((b for b, d in summed.items() if d == node.name), None)
            if bn is not None:
                bn_node = nodes[position[bn]]
                extra["sums"] = bn_grad_sums(bn_node, BN_GRADS[bn_node.op])
        if node.op in BN_GRADS and node.name in summed:
            extra["summed"] = True
        steps += lower_node(node, graph, target, dtype, **extra)
    return steps, remarks


def _untouched_between(source, add, nodes, position, consumers) -> bool:
    """Whether no node between `source` and `add` reads another of source's outputs (source
    then runs at add's place)."""
    between = {n.name for n in nodes[position[source.name] + 1:position[add.name]]}
    return not any(u.name in between for v in source.outputs[1:] for u in consumers.get(v, []))
