"""The CPU backend's steps: what lowering makes of a node and the schedule orders.

A `Step` is one micro-kernel call pattern: the kernel, what each of its pointer roles points
at (a value of the graph or one the backend makes, read as a whole tensor, as the window origin
of a padded buffer, or as packed weights), the tensor of each strided role, its size and scalar
fields (a field may be a function of the batch size), and its iteration space: pixels per
image by channels, and how a shared schedule cuts it. What it writes is the kernel's to say
(its signature's written pointers). Strides are left to the arena, which knows where each value
lives. `check` holds a step to its kernel's signature (`llvm/abi.py`).

A `HostStep` is a node run with its op's NumPy definition: the head's gradient, the loss and
the updates, whose tensors are a few small vectors and matrices (`is_host`).

`TensorTypes` is the precision policy (`precision.py`) for one program's graph: the type each
tensor a step binds is stored in. Lowering builds every kernel in the compute type and then
gives it the stored type of each tensor it points at (`typed`), and checks a step's pointers
against the tensors it binds, so a kernel can never read a tensor as another type than the
arena stores it in.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

from ...errors import GraphError
from ...ops.registry import kind_of
from ...precision import Precision

# Kinds of op run on the host: small tensors, where a kernel call would cost more than it
# saves (parameter-only ops have no per-image tensor at all).
HOST_KINDS = ("loss", "head_grad", "update", "moving_statistics", "parameter")
# Kinds run as kernels though no tensor of theirs has a batch dimension: an exchange with the
# other ranks (`llvm/exchange.py`), run inside the driver's run so that it does not cut a
# step into runs around it.
EXCHANGE_KINDS = ("collective",)


@dataclass(frozen=True)
class Use:
    """How a kernel argument points at a value: "data" (its first element), "window" (the
    top-left corner of a conv's padded window: `pads` before the data), "packed" (the
    value's weights packed into panels of `nr` channels in `layout` (`weights.py`: "" one
    input channel a row, "vnni2" pairs of them interleaved, "amx" pairs in AMX tile rows);
    `transform` "dgrad" rotates and transposes them for a data gradient, "winograd" makes
    them Winograd's), "link" (the int64 words of the program's link to the job's ranks,
    `link.py`: no tensor) or "scratch" (the calling thread's scratch, `Step.scratch` bytes of
    it: no tensor)."""
    value: str
    how: str = "data"
    pads: tuple[int, int] = (0, 0)  # (top, left) for "window"
    nr: int = 0  # for "packed"
    transform: str = ""
    layout: str = ""  # for "packed"


@dataclass(frozen=True)
class Slots:
    """A float64 partial-sum buffer: one slot of `slot_bytes` per chunk of `chunk` pixels of
    `pixels` per image."""
    slot_bytes: int
    pixels: int
    chunk: int

    def count(self, images: int) -> int:
        return -(-images * self.pixels // self.chunk)


@dataclass(kw_only=True)
class Step:
    name: str
    op: str
    kernel: object
    uses: dict[str, Use]  # pointer role -> what it points at
    tensors: dict[str, str]  # strided role -> value
    fields: dict[str, float | int | Callable]  # size or scalar field; a callable takes the batch
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
    scratch: int = 0  # bytes of per-thread scratch its kernel uses (a "scratch" Use)
    map_pixels: int = 0  # output pixels per image, where `pixels` counts other units (tiles)

    @property
    def output_pixels(self) -> int:
        return self.map_pixels or self.pixels

    @property
    def writes(self) -> tuple[str, ...]:
        return self.kernel.signature.written

    @property
    def inputs(self) -> list[str]:
        return [u.value for role, u in self.uses.items()
                if role not in self.writes and u.how != "scratch"]

    @property
    def outputs(self) -> list[str]:
        return [self.uses[role].value for role in self.writes]

    def check(self) -> None:
        self.kernel.signature.check(self)


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


# Tensors the backend makes of a graph value, stored as that value is: "<value><suffix>..."
# (":winograd_pairs": a staged Winograd layer's transformed input, which vdpbf16ps multiplies
# as bfloat16 pairs, as its input is stored; `kernel_steps.winograd_steps`)
MADE_SUFFIXES = (":padded", ":dilated", ":winograd_pairs")


@dataclass(frozen=True, eq=False)
class TensorTypes:
    """The stored type of every tensor of one graph under `precision`."""
    graph: object
    precision: Precision

    @property
    def compute(self) -> str:
        """The kernels' dtype: what they compute in."""
        return self.precision.compute

    @property
    def weights(self) -> str:
        """The type conv weights are rounded to as the kernels read them."""
        return self.precision.weights

    def packed(self, use: Use) -> str:
        """The element type of packed weights: the rounded type for a kernel that multiplies
        it as it is (pairs of bfloat16: "vnni2", "amx"), else the compute type holding the
        rounded values (an FMA kernel then widens no weight in its inner loop)."""
        return self.weights if use.layout else self.compute

    def of(self, value: str) -> str:
        """A graph value's type, or that of the value a made tensor copies."""
        if not self.precision.mixed:
            return self.compute
        known = self._known.get(value)
        if known is None:
            base = next((value[:value.index(s)] for s in MADE_SUFFIXES if s in value), value)
            known = self._known[value] = (self.precision.storage(self.graph.value(base))
                                          if base in self.graph.values else self.compute)
        return known

    @functools.cached_property
    def _known(self) -> dict[str, str]:
        return {}

    def bound(self, use: Use) -> str:
        if use.how == "link":
            return "int64"
        return self.packed(use) if use.how == "packed" else self.of(use.value)

    def typed(self, step: Step) -> Step:
        """`step` with its kernel given the type of each tensor it binds: every pointer the
        kernel declares in its compute type takes the type its tensor is stored in."""
        plain = dataclasses.replace(step.kernel, storage=())
        storage = tuple(sorted(
            (p.role, self.bound(step.uses[p.role])) for p in plain.signature.pointers
            if p.dtype == plain.dtype and self.bound(step.uses[p.role]) != plain.dtype))
        if storage != step.kernel.storage:
            step.kernel = dataclasses.replace(step.kernel, storage=storage)
        return step

    def check(self, step: Step) -> None:
        """Every pointer of the step's kernel of the type its tensor is stored in (slot
        buffers of partial sums are float64, whatever the model's type)."""
        for p in step.kernel.signature.pointers:
            use = step.uses[p.role]
            if p.dtype == "float64" and self.compute != "float64":
                continue  # a slot buffer
            if p.dtype != self.bound(use):
                raise GraphError(f"node {step.origin or step.name!r}: kernel "
                                 f"{step.kernel.symbol} reads {p.role!r} as {p.dtype}, but "
                                 f"{use.value!r} is stored as {self.bound(use)}")


def tensor_types(graph, types) -> TensorTypes:
    """`types` as given, or the policy of a dtype's name for `graph`."""
    return types if isinstance(types, TensorTypes) else TensorTypes(graph, Precision(types))


def image_shape(graph, value: str) -> tuple[int, int, int]:
    """(H, W, C) of one image of a value; [N, C] values are 1 x 1 images."""
    shape = graph.value(value).shape
    return tuple(shape[1:]) if len(shape) == 4 else (1, 1, shape[-1])


def batched(graph, value: str) -> bool:
    shape = graph.value(value).shape
    return bool(shape) and shape[0] == "N"


def is_host(node, graph) -> bool:
    """Whether a node runs as a host step: its kind's, or it has no per-image tensor."""
    kind = kind_of(node.op)
    return kind in HOST_KINDS or (kind not in EXCHANGE_KINDS and not any(
        batched(graph, v) for v in node.inputs + node.outputs))
