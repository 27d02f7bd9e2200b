"""Steps of each kernel kind, built from a node's tensors and fields: what a lowering
(`lower.py`) calls to make a conv, a slot sum, an elementwise chain, a pixel-wise kernel or a
copy into a padded or dilated buffer. Each fills exactly its kernel's signature: the pointer
roles, the strided tensors, the sizes and the scalars."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...ops.registry import get
from ...padding import window_out
from ...precision import BFLOAT16
from .llvm.amx import AmxConvKernel
from .llvm.conv import ConvKernel
from .llvm.epilogue import chain_of
from .llvm.pixelwise import EltwiseKernel
from .llvm.winograd import WinogradInputKernel, WinogradKernel
from .llvm.reduce import SlotSum, sum_kind
from .steps import Slots, Step, TensorTypes, Use, image_shape
from .target import DTYPE_BYTES, Target
from .tuning import (AMX_TILE, PIXEL_SPLIT_MIN, REDUCE_CHUNK, STAGED_MIN_PANELS, conv_tile,
                     panels_outer, stages_windows, widens)
from . import winograd

# How each way of multiplying reads its packed weights (`weights.pack_weights`).
WEIGHT_LAYOUTS = {"fma": "", "dpbf16": "vnni2", "amx": "amx"}


def chain_arguments(kernel, chains, inputs, graph, prologue=()) -> tuple[dict, dict, dict]:
    """Pointer uses, strided tensors and scalar and size fields of a kernel's epilogue chains
    (and of its prologue's), from the node's steps (whose args index `inputs`)."""
    uses, tensors, fields = {}, {}, {}
    pairs = list(zip(kernel.chains, chains)) if chains else []
    if prologue:
        pairs.append((kernel.prologue_chain, prologue))
    for chain, steps in pairs:
        more_uses, more_tensors, more_fields = chain.arguments(
            list(steps), inputs, lambda value: image_shape(graph, value)[2])
        uses.update({role: Use(value) for role, value in more_uses.items()})
        tensors.update(more_tensors)
        fields.update(more_fields)
    return uses, tensors, fields


def output_uses(kernel, values) -> tuple[dict, dict]:
    return {r: Use(v) for r, v in zip(kernel.outputs, values)}, dict(zip(kernel.outputs, values))


def _split(weight_bytes: int, input_bytes: int) -> str:
    """Shared layers split channels when each thread would otherwise read more weights than
    input (the late, wide layers), else pixels."""
    return "channels" if weight_bytes > input_bytes else "pixels"


def pixel_split(pixels: int) -> str:
    return "pixels" if pixels >= PIXEL_SPLIT_MIN else "channels"


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
        return (window_out(h, self.k, self.stride, top, bottom),
                window_out(w, self.k, self.stride, left, right))


@dataclass(frozen=True)
class Sums:
    """Per-channel sums of `op` (`reduce.SUMS`) a conv makes of its output into the slot
    buffer `partial`; a batch-norm gradient's read its `operands` (role -> value: x, gamma,
    ...) and `scalars` (epsilon, alpha)."""
    op: str
    partial: str
    operands: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)


def conv_dot(types: TensorTypes, target: Target, x: str, cin: int) -> str:
    """How a conv multiplies (`ConvKernel.dot`): with bfloat16 inputs and weights, on AMX
    tiles or with vdpbf16ps (pairs of input channels: an even count) where the target has
    them; else fused multiply-adds."""
    if (types.of(x), types.weights) != (BFLOAT16, BFLOAT16):
        return "fma"
    if target.has("amx_bf16"):
        return "amx"
    return "dpbf16" if target.has("avx512_bf16") and cin % 2 == 0 else "fma"


def wgrad_dot(types: TensorTypes, target: Target, x: str, dy: str) -> str:
    """How a weight gradient multiplies (`WgradKernel.dot`): pairs of pixels by vdpbf16ps
    where x and dy are bfloat16 and the target has AVX512-BF16 (an AMX host's weight
    gradients too: no AMX tiles of their own yet), else fused multiply-adds."""
    bf16 = (types.of(x), types.of(dy)) == (BFLOAT16, BFLOAT16)
    return "dpbf16" if bf16 and target.has("avx512_bf16") else "fma"


def conv_step(node, graph, types: TensorTypes, target: Target, x: str, weights: Use,
              geometry: ConvGeometry, outputs, epi=(), out2=None, sums: Sums | None = None,
              inputs=None, prologue=()) -> Step:
    """A convolution step: x (through the `prologue` steps) through the packed weights into
    outputs (and out2), with the epilogue (whose args, and the prologue's, index `inputs`,
    the node's by default), and with `sums` of its output."""
    h, w, cin = geometry.shape
    oh, ow = geometry.out_hw
    dot = conv_dot(types, target, x, cin)
    widening = widens(types.of(x), types.compute, dot)
    stages = bool(prologue) or (widening and stages_windows(geometry.k, cin,
                                                            target.lanes(types.compute)))
    mr, nv = AMX_TILE if dot == "amx" else conv_tile(
        target, types.compute, geometry.cout, widens=widening and not stages, pixels=oh * ow)
    kernel = (AmxConvKernel if dot == "amx" else ConvKernel)(
        types.compute, target, chain_of(epi), None if out2 is None else chain_of(out2), mr, nv,
        sums=sums and sums.op, dot=dot, prologue=chain_of(prologue), stages_rows=stages)
    uses, tensors = output_uses(kernel, outputs)
    uses.update(x=Use(x, "window", geometry.pads[::2]),
                w=Use(weights.value, "packed", nr=kernel.nr, transform=weights.transform,
                      layout=WEIGHT_LAYOUTS[dot]))
    tensors["x"] = x
    size = DTYPE_BYTES[types.of(x)]
    weight_bytes = geometry.k ** 2 * cin * geometry.cout * DTYPE_BYTES[types.packed(uses["w"])]
    fields = dict(cin=cin, kh=geometry.k, kw=geometry.k, stride=geometry.stride, oh=oh, ow=ow,
                  panels_outer=int(panels_outer(weight_bytes, stages)))
    more = chain_arguments(kernel, (epi, out2), list(inputs or node.inputs), graph, prologue)
    for have, extra in zip((uses, tensors, fields), more):
        have.update(extra)
    if stages:
        fields.update(kernel.scratch_fields(fields, geometry.cout))
    step = Step(name=node.name, op=node.op, kernel=kernel, uses=uses, tensors=tensors,
                fields=fields, pixels=oh * ow, channels=geometry.cout, pixel_align=kernel.mr,
                channel_align=kernel.nr, split=_split(weight_bytes, h * w * cin * size),
                flops=2.0 * oh * ow * geometry.cout * geometry.k ** 2 * cin,
                pads={x: geometry.pads})
    if sums is not None:
        _add_sums(step, sums)
    if sums is not None or stages:
        step.uses["scratch"] = Use(f"{step.name}:scratch", "scratch")
        step.scratch = kernel.scratch_for(fields, geometry.cout)
    return step


def takes_winograd(types: TensorTypes, target: Target, x: str, geometry: ConvGeometry) -> bool:
    """Whether an inference convolution (no sums of its output, direct weights) of `x` runs as
    Winograd tiles (`winograd.applies`): where the direct kernel would multiply by fused
    multiply-adds or vdpbf16ps, not on AMX tiles."""
    return winograd.applies(geometry.k, geometry.stride, geometry.pads, geometry.out_hw,
                            geometry.shape[2], target.lanes(types.compute),
                            conv_dot(types, target, x, geometry.shape[2]) != "amx")


def winograd_steps(node, graph, types: TensorTypes, target: Target, x: str, weights: str,
                   geometry: ConvGeometry, outputs, epi=(), out2=None) -> list[Step]:
    """A convolution as Winograd tiles (`takes_winograd`), its "pixels" the tiles of 2 x 2
    output pixels: one kernel, or where the layer is cut by output channels (weights
    outweighing the input: each call a few panels over every tile) into many panels
    (`tuning.STAGED_MIN_PANELS`), the input transform as a step of its own first, so that it
    runs once, not once per call."""
    h, w, cin = geometry.shape
    oh, ow = geometry.out_hw
    size = DTYPE_BYTES[types.compute]
    split = _split(winograd.POINTS * cin * geometry.cout * size, h * w * cin * size)
    tiles = dict(tiles_h=winograd.tiles(oh), tiles_w=winograd.tiles(ow))
    per_image = tiles["tiles_h"] * tiles["tiles_w"]
    mr, nv = conv_tile(target, types.compute, geometry.cout, pixels=per_image)
    panels = -(-geometry.cout // (nv * target.lanes(types.compute)))
    staged = split == "channels" and panels >= STAGED_MIN_PANELS
    dot = conv_dot(types, target, x, cin)
    kernel = WinogradKernel(types.compute, target, chain_of(epi),
                            None if out2 is None else chain_of(out2), mr, nv, staged=staged,
                            dot=dot)
    steps, source = [], x
    if staged:  # the transformed input in the type the products read it in
        source = (f"{x}:winograd_pairs:{node.name}" if dot == "dpbf16"
                  else f"{node.name}:winograd_input")
        transform = WinogradInputKernel(types.compute, target)
        steps.append(Step(name=f"{node.name}/transform", op="winograd_input", kernel=transform,
                          uses={"x": Use(x, "window", (1, 1)), "out": Use(source)},
                          tensors={"x": x, "out": source}, fields=dict(cin=cin, **tiles),
                          pixels=per_image, channels=cin, channel_align=cin,
                          split=pixel_split(per_image), pads={x: winograd.window_pads((oh, ow))},
                          made={source: (winograd.POINTS, per_image, cin)}))
    uses, tensors = output_uses(kernel, outputs)
    uses.update(x=Use(source) if staged else Use(x, "window", (1, 1)),
                w=Use(weights, "packed", nr=kernel.nr, transform="winograd",
                      layout=WEIGHT_LAYOUTS[dot]),
                scratch=Use(f"{node.name}:scratch", "scratch"))
    tensors["x"] = source
    fields = dict(cin=cin, oh=oh, ow=ow, **tiles)
    more = chain_arguments(kernel, (epi, out2), list(node.inputs), graph)
    for have, extra in zip((uses, tensors, fields), more):
        have.update(extra)
    steps.append(Step(name=node.name, op=node.op, kernel=kernel, uses=uses, tensors=tensors,
                      fields=fields, pixels=per_image, channels=geometry.cout, pixel_align=mr,
                      channel_align=kernel.nr, split=split,
                      flops=2.0 * oh * ow * geometry.cout * geometry.k ** 2 * cin,
                      pads={} if staged else {x: winograd.window_pads((oh, ow))},
                      scratch=kernel.scratch_for(fields),
                      map_pixels=oh * ow))
    return steps


def _add_sums(step: Step, sums: Sums) -> None:
    """The conv also sums its output, chunk by chunk, into the slots of `sums.partial`."""
    step.uses.update({f"sums.{role}": Use(v) for role, v in sums.operands.items()})
    step.uses["sums"] = Use(sums.partial)
    if "x" in sums.operands:
        step.tensors["sums.x"] = sums.operands["x"]
    step.fields.update({f"sums.{n}": float(v) for n, v in sums.scalars.items()})
    step.fields.update({"sums.chunk": REDUCE_CHUNK, "sums.width": step.channels})
    step.slots[sums.partial] = Slots(16 * step.channels, step.pixels, REDUCE_CHUNK)
    step.split, step.fixed_chunk = "pixels", REDUCE_CHUNK


def with_sums(conv: Step, sums: Sums | None, outputs, types: TensorTypes, target) -> list[Step]:
    """The conv, then the sum of its sums' slots into `outputs` (the sums op's)."""
    if sums is None:
        return [conv]
    return [conv, slot_sum(f"{conv.name}/sums", sums.op, sums.partial, conv.slots[sums.partial],
                           outputs, conv.channels, types, target)]


def slot_sum(name: str, op: str | None, partial: str, slots: Slots, outputs, width: int,
             types: TensorTypes, target: Target) -> Step:
    """The slots of `partial` summed in order into `outputs`: reduction `op`'s outputs (its
    kind says which row makes which), or one row (a weight gradient) when op is None."""
    if op is not None:
        named = dict(zip(get(op).outputs, outputs))
        outputs = [named[row] for row in sum_kind(op).rows]
    mode = sum_kind(op).combine if op is not None else "sums"
    kernel = SlotSum(types.compute, target, len(outputs), mode)
    uses = {"partial": Use(partial), **{f"out{r}": Use(v) for r, v in enumerate(outputs)}}
    fields = dict(slots=slots.count, width=width)
    if mode == "moments":
        fields.update(images=lambda n: n, pixels=slots.pixels)
    return Step(name=name, op="slot_sum", kernel=kernel, uses=uses, tensors={}, fields=fields,
                pixels=1, channels=width, split="channels", batched=False)


def eltwise_step(node, graph, target, types: TensorTypes, epi, out2, inputs=None,
                 outputs=None) -> Step:
    inputs, outputs = list(inputs or node.inputs), list(outputs or node.outputs)
    kernel = EltwiseKernel(types.compute, target, chain_of(epi),
                           None if out2 is None else chain_of(out2))
    h, w, c = image_shape(graph, inputs[0])
    uses, tensors = output_uses(kernel, outputs)
    uses["x"], tensors["x"] = Use(inputs[0]), inputs[0]
    fields = dict(oh=h, ow=w)
    more = chain_arguments(kernel, (epi, out2), inputs, graph)
    for have, extra in zip((uses, tensors, fields), more):
        have.update(extra)
    return Step(name=node.name, op=node.op, kernel=kernel, uses=uses, tensors=tensors,
                fields=fields, pixels=h * w, channels=c, channel_align=kernel.lanes,
                split=pixel_split(h * w))


def pixel_step(node, kernel, uses: dict, fields: dict, pixels: int, channels: int,
                split: str) -> Step:
    """A pixel-wise kernel whose pointer roles are all strided tensors."""
    return Step(name=node.name, op=node.op, kernel=kernel,
                uses={r: Use(v) for r, v in uses.items()},
                tensors={r: uses[r] for r in kernel.signature.strided}, fields=fields,
                pixels=pixels, channels=channels, channel_align=kernel.lanes, split=split)


def copy_step(name: str, source: str, target_value: str, shape, target: Target,
              types: TensorTypes) -> Step:
    """A plain copy of `source` (images of `shape`) into another layout: the fed images into
    the interior of a padded buffer, dy into a dilated one."""
    kernel = EltwiseKernel(types.compute, target)
    h, w, c = shape
    return Step(name=name, op="copy", kernel=kernel,
                uses={"x": Use(source), "out": Use(target_value)},
                tensors={"x": source, "out": target_value},
                fields=dict(oh=h, ow=w),
                pixels=h * w, channels=c, channel_align=kernel.lanes, split=pixel_split(h * w))
