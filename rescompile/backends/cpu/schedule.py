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
thread would read more weights than input (`lower._split`), with a barrier between layers.

Padding: a conv reads its input through a zero-bordered buffer. The value's producer writes
the interior directly (every kernel writes through strides), so padding costs nothing, except
for a fed value (the images), which a copy step moves into a padded buffer. A value's border is
the widest any consumer needs.

`describe()` prints the schedule (`rescompile dump --schedule`) with the remarks: where a
segment starts and why, which values cannot stay per thread and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .lower import Step, copy_step, image_shape, lower_node

# A segment takes enough images per call for this many output pixels (ResNet-50's 7 x 7
# layers take 6 images, CIFAR's 8 x 8 ones 1).
PIXELS_PER_ITEM = 64
GEMM_OPS = ("conv2d", "fused_conv2d")


@dataclass(frozen=True)
class Segment:
    begin: int
    end: int
    images: int


@dataclass
class Schedule:
    steps: list[Step]
    segments: list[Segment]
    batch_values: dict[str, str]  # value -> why it lives in a batch buffer
    pads: dict[str, tuple[int, int, int, int]]  # value -> zero border
    shapes: dict[str, tuple[int, int, int]]  # value -> (H, W, C) of one image
    feeds: tuple[str, ...]
    fetches: tuple[str, ...]
    remarks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def internal(self) -> list[str]:
        """Values the steps compute, in order of computation."""
        return [v for s in self.steps for v in s.outputs]

    def describe(self) -> str:
        lines = [f"schedule: {len(self.steps)} steps in {len(self.segments)} depth-first "
                 f"segments; remaining images run shared"]
        for g, seg in enumerate(self.segments):
            lines.append(f"segment {g}: steps {seg.begin}-{seg.end - 1}, {seg.images} "
                         f"image(s) per call")
            for s in self.steps[seg.begin:seg.end]:
                kernel = s.kernel.symbol
                placed = ", ".join(f"{v} [{'batch' if v in self.batch_values else 'thread'}]"
                                   for v in s.outputs)
                lines.append(f"  {s.name}: {kernel} {s.pixels}px x {s.channels}ch, shared "
                             f"split by {s.split} -> {placed}")
        lines += [f"remark {name}: {text}" for name, text in self.remarks]
        return "\n".join(lines) + "\n"


def build_schedule(graph, entry, target, dtype: str) -> Schedule:
    steps = [lower_node(node, graph, target, dtype) for node in entry.nodes]
    produced = {v for s in steps for v in s.outputs}
    pads = _borders(steps)
    steps, remarks = _pad_fed_inputs(steps, pads, produced, graph, target, dtype)
    segments, seg_remarks = _segments(steps)
    shapes = {v: image_shape(graph, v) for s in steps for v in s.tensors.values()
              if v in graph.values}
    shapes.update({f"{v}:padded": image_shape(graph, v) for v in entry.feeds})
    schedule = Schedule(steps, segments, {}, pads, shapes, tuple(entry.feeds),
                        tuple(entry.fetches), remarks + seg_remarks)
    schedule.batch_values = _batch_values(schedule)
    schedule.remarks += [(v, f"in a batch buffer: {why}")
                         for v, why in schedule.batch_values.items()]
    return schedule


def _borders(steps: list[Step]) -> dict[str, tuple[int, int, int, int]]:
    pads: dict[str, tuple[int, int, int, int]] = {}
    for step in steps:
        for value, need in step.pads.items():
            have = pads.get(value, (0, 0, 0, 0))
            pads[value] = tuple(max(a, b) for a, b in zip(have, need))
    return {v: p for v, p in pads.items() if any(p)}


def _pad_fed_inputs(steps, pads, produced, graph, target, dtype):
    """Copy each padded value no step produces (a fed one) into a padded buffer of its own."""
    out, remarks = [], []
    copied: dict[str, str] = {}
    for step in steps:
        for value in step.inputs:
            if value in pads and value not in produced and value not in copied:
                copied[value] = f"{value}:padded"
                out.append(copy_step(f"{value}/pad", value, copied[value], graph, target,
                                     dtype))
                remarks.append((value, f"copied into a zero-bordered buffer {pads[value]} "
                                       f"for {step.name}: it is fed, so no kernel writes it"))
        if copied:
            _rename_inputs(step, copied)
        out.append(step)
    for value, padded in copied.items():
        pads[padded] = pads.pop(value)
    return out, remarks


def _rename_inputs(step: Step, renamed: dict[str, str]) -> None:
    for role, use in list(step.uses.items()):
        if not role.startswith("out") and use.value in renamed:
            step.uses[role] = type(use)(renamed[use.value], use.how, use.pads, use.nr)
    step.tensors = {r: renamed.get(v, v) if not r.startswith("out") else v
                    for r, v in step.tensors.items()}
    step.pads = {renamed.get(v, v): p for v, p in step.pads.items()}


def _images_per_item(step: Step) -> int | None:
    if step.op not in GEMM_OPS:
        return None
    return max(1, math.ceil(PIXELS_PER_ITEM / step.pixels))


def _segments(steps: list[Step]) -> tuple[list[Segment], list[tuple[str, str]]]:
    segments, remarks = [], []
    begin, images = 0, None
    for i, step in enumerate(steps):
        wanted = _images_per_item(step)
        if wanted is None or wanted == images:
            continue
        if images is not None:
            segments.append(Segment(begin, i, images))
            remarks.append((step.name, f"starts a segment: {step.pixels} pixels per image, "
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
