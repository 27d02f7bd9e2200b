"""The schedule: the CPU backend's named stage between the optimised graph and the driver.

Design note
-----------
Inference has no dependency between images, so the schedule runs each image through the
whole network before the next one (depth first), on one thread, with every intermediate value
in that thread's own buffers: at batch 128 the activations of one image (about 1 MiB at
ResNet-164's first stage) stay in the core's caches instead of streaming 32 MiB tensors
through DRAM between layers (NUMBA-NOTES, "cross-layer tiling"). The steps are split into
segments, and a segment takes `images` images at a time: late layers with few pixels per image
(8 x 8, 7 x 7) take several images per call, so that their weights are reused across a longer
M. A value read by a later segment, fetched by the caller, or fed by it lives in a batch
buffer; everything else lives in per-thread buffers.

The images that do not divide evenly among the threads (all of them at batch 1) run the same
steps shared: each layer split over the threads by pixels, or by channel panels where a
thread would read more weights than input (`kernel_steps._split`) and the panels are at least
as many as the threads (`Arena._split`), with a barrier between layers.

Training depends across images (batch statistics), so its schedule is shared throughout: every
step over the whole batch, cut into pieces the threads take, a barrier after each. Host steps
(the head's gradient, the loss, the updates: small NumPy ops) sit between runs of kernel steps.

Padding: a conv reads its input through a zero-bordered buffer. The value's producer writes
the interior directly (every kernel writes through strides), so padding costs nothing, except
for a value no kernel step makes (the fed images, a host step's output), which a copy step
moves into a padded buffer. A value's border is the widest any consumer needs.

`describe()` prints the schedule (`rescompile dump --schedule`) with the remarks: where a
segment starts and why, which values cannot stay per thread and why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ...ops.registry import OPS
from .arena import Layout
from .kernel_steps import copy_step
from .lower import lower_node
from .steps import HostStep, Slots, Step, TensorTypes, batched, image_shape, tensor_types
from .tuning import images_per_item


@dataclass(frozen=True)
class Segment:
    begin: int
    end: int
    images: int


@dataclass(eq=False)  # compared and hashed by identity: programs key arenas by schedule
class Schedule:
    steps: list  # Step or HostStep
    segments: list[Segment]  # depth first (inference); none in a shared schedule
    batch_values: dict[str, str]  # value -> why it lives in a batch buffer
    pads: dict[str, tuple[int, int, int, int]]  # value -> zero border
    shapes: dict[str, tuple[int, int, int]]  # per-image tensor -> (H, W, C) of one image
    flat: dict[str, int]  # tensor of no batch dimension the kernels make -> elements
    slots: dict[str, Slots]  # float64 partial-sum buffers
    dilated: set[str]  # tensors written only at every stride-th pixel
    feeds: tuple[str, ...]
    fetches: tuple[str, ...]
    keep: dict[str, int] = field(default_factory=dict)  # value -> last step it must survive
    remarks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kernel_steps(self) -> list[Step]:
        return [s for s in self.steps if isinstance(s, Step)]

    @property
    def internal(self) -> list[str]:
        """Values the kernel steps compute, in order of computation."""
        return [v for s in self.kernel_steps for v in s.outputs]

    def describe(self) -> str:
        mode = (f"{len(self.segments)} depth-first segments; remaining images run shared"
                if self.segments else "every step shared over the threads")
        lines = [f"schedule: {len(self.steps)} steps, {mode}"]
        ranges = [(f"segment {g}: steps {seg.begin}-{seg.end - 1}, {seg.images} image(s) per "
                   f"call", seg.begin, seg.end) for g, seg in enumerate(self.segments)]
        for title, begin, end in ranges or [("steps", 0, len(self.steps))]:
            lines.append(title)
            lines += ["  " + self._line(s) for s in self.steps[begin:end]]
        lines += [f"remark {name}: {text}" for name, text in self.remarks]
        return "\n".join(lines) + "\n"

    def _placement(self, value: str) -> str:
        if not self.segments:
            return "shared"
        return "batch" if value in self.batch_values else "thread"

    def _line(self, s) -> str:
        if isinstance(s, HostStep):
            return f"{s.name}: host {s.op} -> {', '.join(s.outputs)}"
        placed = ", ".join(f"{v} [{self._placement(v)}]" for v in s.outputs)
        tiles = f" ({s.pixels} tiles)" if s.map_pixels else ""
        return (f"{s.name}: {s.kernel.symbol} {s.output_pixels}px{tiles} x {s.channels}ch, "
                f"split by {s.split} -> {placed}")


def build_schedule(graph, entry, target, types: TensorTypes, tuner=None) -> Schedule:
    """Inference: depth first over images, the remainder shared; `types` the type each tensor
    is stored in; `tuner` chooses the conv tiles (`autotune.py`; none: the derived ones)."""
    schedule = _lowered(graph, list(entry.nodes), entry.feeds, entry.fetches, target, types,
                        tuner)
    schedule.segments, seg_remarks = _segments(schedule.steps)
    schedule.remarks += seg_remarks
    schedule.batch_values = _batch_values(schedule)
    schedule.remarks += [(v, f"in a batch buffer: {why}")
                         for v, why in schedule.batch_values.items()]
    return schedule


def build_shared_schedule(graph, nodes, feeds, fetches, target, types: TensorTypes,
                          keep: dict[str, int] | None = None, tuner=None) -> Schedule:
    """Training: every step over the whole batch; `keep` extends values past their last
    reader (an entry's fetches, to the entry's last node)."""
    schedule = _lowered(graph, nodes, feeds, fetches, target, types, tuner)
    schedule.keep = dict(keep or {})
    return schedule


def _lowered(graph, nodes, feeds, fetches, target, types, tuner) -> Schedule:
    types = tensor_types(graph, types)
    steps = [s for node in nodes for s in lower_node(node, graph, target, types)]
    produced = {v for s in steps if isinstance(s, Step) for v in s.outputs}
    pads = _borders(steps)
    shapes = {v: image_shape(graph, v) for s in steps if isinstance(s, Step)
              for v in s.tensors.values() if v in graph.values and batched(graph, v)}
    for s in steps:
        if isinstance(s, Step):
            shapes.update(s.made)
    steps, remarks = _pad_unmade_inputs(steps, pads, produced, shapes, target, types)
    if tuner is not None:
        layouts = {v: Layout(*shape, pads.get(v, (0, 0, 0, 0))) for v, shape in shapes.items()}
        steps, choices = tuner.retile(steps, layouts)
        remarks += choices
    kernel_steps = [s for s in steps if isinstance(s, Step)]
    flat = {v: math.prod(graph.value(v).shape) for s in kernel_steps for v in s.outputs
            if v in graph.values and not batched(graph, v)}
    slots = {v: b for s in kernel_steps for v, b in s.slots.items()}
    dilated = {v for s in kernel_steps for v in s.dilated}
    return Schedule(steps, [], {}, pads, shapes, flat, slots, dilated, tuple(feeds),
                    tuple(fetches), remarks=remarks)


def _borders(steps) -> dict[str, tuple[int, int, int, int]]:
    pads: dict[str, tuple[int, int, int, int]] = {}
    for step in steps:
        for value, need in getattr(step, "pads", {}).items():
            have = pads.get(value, (0, 0, 0, 0))
            pads[value] = tuple(max(a, b) for a, b in zip(have, need))
    return {v: p for v, p in pads.items() if any(p)}


def _pad_unmade_inputs(steps, pads, produced, shapes, target, types):
    """Copy each padded value no kernel step produces (a fed one, a host step's output) into a
    padded buffer of its own before its first reader."""
    out, remarks = [], []
    copied: dict[str, str] = {}
    for step in steps:
        if isinstance(step, Step):
            for value in step.inputs:
                if value in pads and value not in produced and value not in copied:
                    copied[value] = f"{value}:padded"
                    shapes[copied[value]] = shapes[value]
                    copy = types.typed(copy_step(f"{value}/pad", value, copied[value],
                                                 shapes[value], target, types))
                    copy.origin = step.origin
                    copy.check()
                    types.check(copy)
                    out.append(copy)
                    remarks.append((value, f"copied into a zero-bordered buffer "
                                           f"{pads[value]} for {step.name}: no kernel "
                                           f"writes it"))
            if copied:
                _rename_inputs(step, copied)
        out.append(step)
    for value, padded in copied.items():
        pads[padded] = pads.pop(value)
    return out, remarks


def _rename_inputs(step: Step, renamed: dict[str, str]) -> None:
    for role, use in list(step.uses.items()):
        if role not in step.writes and use.value in renamed:
            step.uses[role] = dataclasses.replace(use, value=renamed[use.value])
    step.tensors = {r: renamed.get(v, v) if r not in step.writes else v
                    for r, v in step.tensors.items()}
    step.pads = {renamed.get(v, v): p for v, p in step.pads.items()}


def _images_per_item(step: Step) -> int | None:
    """Images per call of a segment that starts at a convolution (a segment takes its size
    from the convolutions, whose weights a longer M reuses)."""
    op = OPS.get(step.op)  # a step of the backend's own ("copy", "slot_sum") has none
    if op is None or op.kind != "conv":
        return None
    return images_per_item(step.output_pixels)


def _segments(steps: list[Step]) -> tuple[list[Segment], list[tuple[str, str]]]:
    segments, remarks = [], []
    begin, images = 0, None
    for i, step in enumerate(steps):
        wanted = _images_per_item(step)
        if wanted is None or wanted == images:
            continue
        if images is not None:
            segments.append(Segment(begin, i, images))
            remarks.append((step.name, f"starts a segment: {step.output_pixels} pixels per image, "
                                       f"{wanted} image(s) per call instead of {images}"))
            begin = i
        images = wanted
    segments.append(Segment(begin, len(steps), images or 1))
    return segments, remarks


def _batch_values(schedule: Schedule) -> dict[str, str]:
    segment_of = {}
    for g, seg in enumerate(schedule.segments):
        for step in schedule.steps[seg.begin:seg.end]:
            for v in step.outputs:
                segment_of[v] = g
    why = {}
    for v in schedule.fetches:
        why[v] = "fetched by the caller"
    for g, seg in enumerate(schedule.segments):
        for step in schedule.steps[seg.begin:seg.end]:
            for v in step.inputs:
                if v in segment_of and segment_of[v] != g:
                    why.setdefault(v, f"read by {step.name} in a later segment")
    return why
