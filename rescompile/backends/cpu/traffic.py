"""The bytes a kernel step reads and writes, beside its FLOPs in the profile, so that the
memory-bound layers show: a 1x1 convolution from 16 to 64 float32 channels does 6.4 FLOPs per
byte of its input and output, a 3x3 one from 64 to 64 does 144.

What is counted is what the step's tensors say, for the images of one run of the entry:
- a per-image tensor: its interior, H x W x C elements per image (a zero border is not data),
  each of the bytes of the type it is stored in (`steps.TensorTypes`: a bfloat16 model's
  activations 2, its per-channel vectors 4);
- a dilated tensor's writer: only the samples it writes (its iteration space);
- packed weights: the packed panels once per run, in their layout and packed type
  (`program.packed_bytes`; a depth-first segment rereads them for every image it takes,
  mostly from cache);
- a float64 slot buffer: its slots for the batch; the link to the ranks: nothing; any other
  tensor: its graph shape.
It is the traffic the kernels ask for, not a measurement of DRAM's: a tensor still in a cache
counts the same, and a value read through two roles counts once.
"""

from __future__ import annotations

import math

from .arena import Arena
from .steps import Step, Use


def step_bytes(arena: Arena, step: Step) -> tuple[int, int]:
    """(bytes read, bytes written) of `step` over the arena's batch."""
    reads = {u.value: u for role, u in step.uses.items() if role not in step.writes}
    read = sum(_tensor_bytes(arena, use) for use in reads.values())
    written = sum(_written_bytes(arena, step, value) for value in dict.fromkeys(step.outputs))
    return read, written


def _written_bytes(arena: Arena, step: Step, value: str) -> int:
    if value in step.dilated:  # every stride-th pixel: the samples the step iterates over
        return step.pixels * step.channels * arena.itemsize(value) * arena.batch
    return _tensor_bytes(arena, Use(value))


def _tensor_bytes(arena: Arena, use: Use) -> int:
    schedule, graph, value = arena.schedule, arena.program.graph, use.value
    if use.how in ("link", "scratch"):
        return 0
    if use.how == "packed":
        return arena.program.packed_bytes(use)
    if value in schedule.slots:
        slots = schedule.slots[value]
        return slots.count(arena.batch) * slots.slot_bytes
    if value in arena.layouts:
        layout = arena.layouts[value]
        return layout.h * layout.w * layout.c * arena.itemsize(value) * arena.batch
    return math.prod(graph.value(value).concrete_shape(arena.batch)) * arena.itemsize(value)
