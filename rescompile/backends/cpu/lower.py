"""Lowering: each node as calls of micro-kernels (`steps.Step`), or as a host step; one table
(`LOWERINGS`) maps op names to lowerings, and an op missing from it is refused with the node's
name. Lowering never fuses: every fusion is a pass (`passes/`), and a fused node keeps exactly
the epilogue steps the passes gave it (`llvm/epilogue.py` has one rule per step).

Training adds the gradient kernels:
- a conv's data gradient is the forward tile on dy with the weights rotated and transposed;
  with a stride, dy is first copied into a zero buffer at every stride-th pixel (a "dilated"
  buffer), so every data gradient is one stride-1 convolution;
- a conv's weight gradient is the weight-gradient tile into float64 slots, then their sum;
- a reduction (batch statistics, a batch-norm gradient's sums) is its sums into slots, made
  by the producing conv's kernel where a pass put it there, else by a sums kernel, then their
  sum; a batch-norm gradient's apply is one elementwise kernel.
Every reduction runs in fixed chunks of pixels (`tuning.py`), one slot each, so no result
depends on the number of threads.
"""

from __future__ import annotations

from ...errors import GraphError, UsageError
from ...ops.fused import pool_pad_params
from ...ops.collective import COMBINE
from ...ops.fused_train import GRAD_HALVES
from ...ops.registry import get, kind_of
from ...padding import pads_2d
from .kernel_steps import (ConvGeometry, Sums, chain_arguments, conv_step, copy_step,
                           eltwise_step, pixel_split, pixel_step, slot_sum, takes_winograd,
                           wgrad_dot, winograd_steps, with_sums)
from .llvm.epilogue import RULES, chain_of
from .llvm.exchange import LINK_VALUE, RankExchange
from .llvm.pixelwise import (MaxPoolGradKernel, MaxPoolKernel, MeanGradKernel, MeanKernel,
                             PoolPadKernel, SpreadKernel)
from .llvm.reduce import MOMENTS, SUMS, BatchNormGradApply, ChannelSums, sum_kind
from .llvm.wgrad import WgradKernel
from .steps import (HOST_KINDS, HostStep, Slots, Step, TensorTypes, Use, image_shape,
                    is_host, tensor_types)
from .target import Target
from .tuning import REDUCE_CHUNK, WGRAD_CHUNK, WGRAD_GROUPS, conv_tile


# -- convolutions ---------------------------------------------------------------------------

def _conv(node, graph, target, types):
    attrs, (x, w) = node.attrs, node.inputs[:2]
    h, wd, cin = image_shape(graph, x)
    k = graph.value(w).shape[0]
    geometry = ConvGeometry((h, wd, cin), k, graph.value(w).shape[-1], attrs["stride"],
                            pads_2d(h, wd, k, attrs["stride"], attrs["padding"]))
    outputs = list(node.outputs)
    sums = Sums(MOMENTS, f"{node.name}:stats") if attrs.get("stats") else None
    prologue = attrs.get("prologue", ())
    if sums is None and not prologue and takes_winograd(types, target, x, geometry):
        return winograd_steps(node, graph, types, target, x, w, geometry, outputs,
                              attrs.get("epilogue", ()), attrs.get("out2"))
    made = outputs[:-2] if sums else outputs
    conv = conv_step(node, graph, types, target, x, Use(w), geometry, made,
                     attrs.get("epilogue", ()), attrs.get("out2"), sums, prologue=prologue)
    return with_sums(conv, sums, outputs[len(made):], types, target)


def _dense(node, graph, target, types):
    """x [N, C] @ w [C, K] + b: a 1x1 conv over 1x1 images with a bias epilogue."""
    c, k = graph.value(node.inputs[1]).shape
    step = conv_step(node, graph, types, target, node.inputs[0], Use(node.inputs[1]),
                     ConvGeometry((1, 1, c), 1, k, 1, (0, 0, 0, 0)), list(node.outputs),
                     [{"op": "bias_add", "args": [2]}])
    step.split = "channels"
    return [step]


def _grad_input(node, graph, target, types):
    """dx = the forward tile on dy, padded by k - 1 - pad (and dilated by the stride), with
    the weights rotated by 180 degrees and input and output channels swapped; then the
    node's epilogue (a gradient add) and its `sums` (a batch-norm gradient's) of the result."""
    dy, w = node.inputs[:2]
    k, cin = graph.value(w).shape[0], graph.value(w).shape[2]
    (h, wd), stride = node.attrs["in_hw"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, wd, k, stride, node.attrs["padding"])
    oh, ow, cout = image_shape(graph, dy)
    hd, wdd = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    pads = (k - 1 - top, h + top - hd, k - 1 - left, wd + left - wdd)
    if min(pads) < 0:
        raise GraphError(f"node {node.name!r}: no data-gradient padding for this geometry")
    steps, source = [], dy
    if stride > 1:
        source = f"{dy}:dilated{stride}"
        copy = copy_step(f"{node.name}/dilate", dy, source, (oh, ow, cout), target, types)
        copy.stride_scale = {"out": stride}
        copy.made[source] = (hd, wdd, cout)
        copy.dilated = (source,)
        steps.append(copy)
    step = node.attrs.get("sums")
    sums = step and Sums(step["op"], f"{node.name}:sums",
                         _roles(step["op"], [node.inputs[i] for i in step["args"]], skip=1),
                         {n: step[n] for n in sum_kind(step["op"]).scalars})
    conv = conv_step(node, graph, types, target, source, Use(w, transform="dgrad"),
                     ConvGeometry((hd, wdd, cout), k, cin, 1, pads), node.outputs[:1],
                     node.attrs.get("epilogue", ()), sums=sums)
    return steps + with_sums(conv, sums, node.outputs[1:], types, target)


def _roles(op: str, values, skip: int = 0) -> dict[str, str]:
    """`values` by the roles of `op`'s inputs (after its first `skip`)."""
    return dict(zip(get(op).inputs[skip:], values))


def _grad_filter(node, graph, target, types):
    """dW from the weight-gradient tile, chunk by chunk into float64 slots, then their sum;
    with a prologue, on x through its steps (staged a block of pixels at a time)."""
    x, dy = node.inputs[:2]
    prologue = node.attrs.get("prologue", ())
    k, stride = node.attrs["k"], node.attrs["stride"]
    h, w, cin = image_shape(graph, x)
    oh, ow, cout = image_shape(graph, dy)
    pads = pads_2d(h, w, k, stride, node.attrs["padding"])
    tile = conv_tile(target, types.compute, cout, depth=k * k * cin)  # its k loop: no widening
    kernel = WgradKernel(types.compute, target, *tile, prologue=chain_of(prologue),
                         dot=wgrad_dot(types, target, x, dy))
    partial = f"{node.name}:partial"
    slots = Slots(8 * k * k * cin * cout, oh * ow, WGRAD_CHUNK)
    uses = {"x": Use(x, "window", pads[::2]), "dy": Use(dy), "partial": Use(partial)}
    tensors = {"x": x, "dy": dy}
    fields = dict(cin=cin, kh=k, kw=k, stride=stride, oh=oh, ow=ow, chunk=WGRAD_CHUNK,
                  width=cout)
    scratch = Use(f"{node.name}:scratch", "scratch")
    if prologue:
        more = chain_arguments(kernel, (), list(node.inputs), graph, prologue)
        for have, extra in zip((uses, tensors, fields), more):
            have.update(extra)
    if prologue or kernel.paired:  # staged through the prologue, or in pairs whatever stored
        uses["scratch"] = scratch
    step = types.typed(Step(
        name=node.name, op=node.op, kernel=kernel, uses=uses, tensors=tensors, fields=fields,
        pixels=oh * ow, channels=cout, channel_align=kernel.nr, split="both",
        flops=2.0 * oh * ow * cout * k * k * cin, pads={x: pads}, fixed_chunk=WGRAD_CHUNK,
        groups=min(-(-cout // kernel.nr), WGRAD_GROUPS), slots={partial: slots}))
    if step.kernel.staged:  # its x and dy in the scratch: stored narrower, widened, or in pairs
        fields.update(step.kernel.scratch_fields(fields))
        uses["scratch"] = scratch
    if "scratch" in uses:
        step.scratch = step.kernel.scratch_for(fields, cout)
    return [step, slot_sum(f"{node.name}/sum", None, partial, slots, list(node.outputs),
                           k * k * cin * cout, types, target)]


# -- reductions and batch norm ----------------------------------------------------------------

def _reduction(node, graph, target, types):
    """A reduction (`reduce.SUMS`) by its own sums kernel, then the sum of its slots."""
    roles = _roles(node.op, node.inputs)
    h, w, c = shape = image_shape(graph, node.inputs[0])
    partial = f"{node.name}:partial"
    kernel = ChannelSums(types.compute, target, node.op)
    slots = Slots(16 * c, h * w, REDUCE_CHUNK)
    step = Step(name=node.name, op=node.op, kernel=kernel,
                uses={"partial": Use(partial), **{r: Use(v) for r, v in roles.items()}},
                tensors={r: roles[r] for r in kernel.signature.strided},
                fields=dict(oh=h, ow=w, chunk=REDUCE_CHUNK, width=c,
                            **{n: float(node.attrs[n]) for n in sum_kind(node.op).scalars}),
                pixels=h * w, channels=c, channel_align=kernel.lanes, fixed_chunk=REDUCE_CHUNK,
                slots={partial: slots})
    return [step, slot_sum(f"{node.name}/combine", node.op, partial, slots, node.outputs,
                           shape[2], types, target)]


def _bn_grad_apply(node, graph, target, types):
    """A batch-norm gradient's apply half (or its fused form, with an epilogue)."""
    head = get(node.op).head or node.op
    kernel = BatchNormGradApply(types.compute, target, head,
                                chain_of(node.attrs.get("epilogue")))
    roles = _roles(head, node.inputs)
    (dx,) = node.outputs
    h, w, c = image_shape(graph, roles["x"])
    uses = {**{r: Use(v) for r, v in roles.items()}, "out": Use(dx)}
    tensors = {"dy": roles["dy"], "x": roles["x"], "out": dx}
    fields = dict(oh=h, ow=w, images=lambda n: n,
                  **{n: float(node.attrs[n]) for n in ("epsilon", "alpha") if n in node.attrs})
    more = chain_arguments(kernel, [node.attrs.get("epilogue", ())], list(node.inputs),
                           graph)
    for have, extra in zip((uses, tensors, fields), more):
        have.update(extra)
    return [Step(name=f"{node.name}/apply", op=node.op, kernel=kernel, uses=uses,
                 tensors=tensors, fields=fields, pixels=h * w, channels=c,
                 channel_align=kernel.lanes, split=pixel_split(h * w))]


def _whole_bn_grad(node, graph, target, types):
    """A batch-norm gradient no pass split (optimize=False): its halves, one after the other."""
    sums_op, apply_op = GRAD_HALVES[node.op]
    dx, *sums = node.outputs
    return (_reduction(node.replace(op=sums_op, outputs=tuple(sums)), graph, target, types)
            + _bn_grad_apply(node.replace(op=apply_op, inputs=node.inputs + tuple(sums),
                                          outputs=(dx,)), graph, target, types))


def _batch_norm(node, graph, target, types):
    """Inference: normalise with the moving statistics. Training, unfused (optimize=False):
    the moments, then normalise with them."""
    if not node.attrs["training"]:
        step = {"op": "batch_normalize", "args": [1, 2, 3, 4], "epsilon": node.attrs["epsilon"]}
        return [eltwise_step(node, graph, target, types, [step], None)]
    if node.attrs.get("sync"):
        raise UsageError(f"node {node.name!r}: a synchronised batch norm runs on the cpu "
                         f"backend split into its halves (compile with optimize=True)")
    x, gamma, beta = node.inputs
    y, mean, var = node.outputs
    moments = node.replace(op=MOMENTS, inputs=(x,), outputs=(mean, var), attrs={})
    normalize = {"op": "batch_normalize", "args": [1, 2, 3, 4], "epsilon": node.attrs["epsilon"]}
    return _reduction(moments, graph, target, types) + [
        eltwise_step(node, graph, target, types, [normalize], None,
                     inputs=[x, gamma, beta, mean, var], outputs=[y])]


# -- elementwise, pooling, copies ----------------------------------------------------------

def _fused_eltwise(node, graph, target, types):
    attrs = node.attrs
    stats = list(node.outputs[-2:]) if attrs.get("stats") else []
    outputs = node.outputs[:len(node.outputs) - len(stats)]
    steps = [eltwise_step(node, graph, target, types, attrs["epilogue"], attrs.get("out2"),
                          outputs=outputs)]
    if stats:
        moments = node.replace(op=MOMENTS, inputs=(outputs[0],), outputs=tuple(stats), attrs={})
        steps += _reduction(moments, graph, target, types)
    return steps


def _single(op: str):
    """A lone epilogue op: its first input flows through one epilogue step of its own."""
    def lower(node, graph, target, types):
        step = {"op": op, "args": list(range(1, len(node.inputs))), **node.attrs}
        return [eltwise_step(node, graph, target, types, [step], None)]
    return lower


def _pool_fields(node, graph, x):
    h, w, c = image_shape(graph, x)
    k, s = node.attrs["k"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, w, k, s, node.attrs["padding"])
    return h, w, c, dict(k=k, stride=s, pad_top=top, pad_left=left, h=h, w=w)


def _max_pool(node, graph, target, types):
    h, w, c, fields = _pool_fields(node, graph, node.inputs[0])
    oh, ow, _ = image_shape(graph, node.outputs[0])
    return [pixel_step(node, MaxPoolKernel(types.compute, target),
                        {"x": node.inputs[0], "out": node.outputs[0]},
                        dict(fields, oh=oh, ow=ow), oh * ow, c, pixel_split(oh * ow))]


def _max_pool_grad(node, graph, target, types):
    dy, x = node.inputs
    h, w, c, fields = _pool_fields(node, graph, x)
    oh, ow, _ = image_shape(graph, dy)
    return [pixel_step(node, MaxPoolGradKernel(types.compute, target),
                        {"dy": dy, "x": x, "out": node.outputs[0]},
                        dict(fields, oh=oh, ow=ow), h * w, c, pixel_split(h * w))]


def _mean(node, graph, target, types):
    h, w, c = image_shape(graph, node.inputs[0])
    return [pixel_step(node, MeanKernel(types.compute, target),
                        {"x": node.inputs[0], "out": node.outputs[0]}, dict(h=h, w=w), 1, c,
                        "channels")]


def _mean_grad(node, graph, target, types):
    h, w, c = image_shape(graph, node.outputs[0])
    return [pixel_step(node, MeanGradKernel(types.compute, target),
                       {"dy": node.inputs[0], "out": node.outputs[0]}, dict(oh=h, ow=w),
                       h * w, c, pixel_split(h * w))]


def _pool_pad(node, graph, target, types):
    """avg_pool or pad_channels: the pooled, padded read of the input (k = 1 or before = 0)."""
    (x,), (out,) = node.inputs, node.outputs
    oh, ow, c = image_shape(graph, out)
    k, before = pool_pad_params(node.attrs)
    fields = dict(oh=oh, ow=ow, k=k, before=before, channels=image_shape(graph, x)[2])
    return [pixel_step(node, PoolPadKernel(types.compute, target), {"x": x, "out": out}, fields,
                       oh * ow, c, pixel_split(oh * ow))]


def _spread(node, graph, target, types):
    """avg_pool_grad, crop_channels or both (pool_pad_grad): dy spread over each block, from
    channel `before`."""
    (dy,), (out,) = node.inputs, node.outputs
    h, w, c = image_shape(graph, out)
    rows, cols, _ = image_shape(graph, dy)
    k, before = pool_pad_params(node.attrs)
    fields = dict(oh=h, ow=w, k=k, before=before, rows=rows, cols=cols)
    return [pixel_step(node, SpreadKernel(types.compute, target), {"dy": dy, "out": out}, fields,
                       h * w, c, pixel_split(h * w))]


# -- exchanges with the other ranks -----------------------------------------------------------

def _exchange(node, graph, target, types):
    """A collective op: this rank's two vectors exchanged with the other ranks and combined,
    in one call (its width is one channel-aligned unit, so the step is one piece)."""
    (width,) = graph.value(node.inputs[0]).shape
    kernel = RankExchange(types.compute, target, node.op)
    uses = {"link": Use(LINK_VALUE, "link"),
            **{f"in{k}": Use(v) for k, v in enumerate(node.inputs)},
            **{f"out{k}": Use(v) for k, v in enumerate(node.outputs)}}
    return [Step(name=node.name, op=node.op, kernel=kernel, uses=uses, tensors={},
                 fields=dict(width=width), pixels=1, channels=width, channel_align=width,
                 split="channels", batched=False)]


LOWERINGS = {
    "conv2d": _conv,
    "fused_conv2d": _conv,
    "prologue_fused_conv2d": _conv,
    "dense": _dense,
    "conv2d_grad_input": _grad_input,
    "fused_conv2d_grad_input": _grad_input,
    "conv2d_grad_filter": _grad_filter,
    "prologue_conv2d_grad_filter": _grad_filter,
    "fused_elementwise": _fused_eltwise,
    **{op: _single(op) for op in RULES},
    **{op: _reduction for op in SUMS},
    "batch_norm": _batch_norm,
    "batch_norm_grad": _whole_bn_grad,
    "batch_norm_relu_grad": _whole_bn_grad,
    "batch_norm_grad_apply": _bn_grad_apply,
    "batch_norm_relu_grad_apply": _bn_grad_apply,
    "fused_batch_norm_grad_apply": _bn_grad_apply,
    "fused_batch_norm_relu_grad_apply": _bn_grad_apply,
    "max_pool": _max_pool,
    "max_pool_grad": _max_pool_grad,
    "global_avg_pool": _mean,
    "global_avg_pool_grad": _mean_grad,
    "avg_pool": _pool_pad,
    "pad_channels": _pool_pad,
    "avg_pool_grad": _spread,
    "crop_channels": _spread,
    "pool_pad_grad": _spread,
    **{op: _exchange for op in COMBINE},
}


def supports(op: str) -> bool:
    """Whether the cpu backend runs op (as kernels, or as a host step)."""
    return op in LOWERINGS or kind_of(op) in HOST_KINDS


def lower_node(node, graph, target: Target, types: TensorTypes | str) -> list:
    """The node's steps, each kernel given the types its tensors are stored in (`types`) and
    checked against its signature; a host step for the small ops of the head, the loss and
    the updates, and for any node with no per-image tensor."""
    if is_host(node, graph):
        return [HostStep(node)]
    lowering = LOWERINGS.get(node.op)
    if lowering is None:
        raise GraphError(f"node {node.name!r}: the cpu backend has no kernel for op "
                         f"{node.op!r}")
    types = tensor_types(graph, types)
    steps = lowering(node, graph, target, types)
    for step in steps:
        step.origin = node.name
        types.typed(step)
        step.check()
        types.check(step)
    return steps
