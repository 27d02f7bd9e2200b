"""Each conv and weight-gradient step's register tile, chosen on the host: derived, or measured
once and cached.

Design note
-----------
A conv step's tile (MR rows of pixels by NV vectors of channels) decides how well the kernel
uses the host's registers and load ports, which the instruction set alone does not settle: a
6 x 64 tile of AVX-512 loads fewer broadcasts per multiply-add than a 14 x 32 one but keeps
fewer rows in flight. Lowering gives every conv the derived tile (`tuning.conv_tile`). Where a
layer admits other tiles (`candidates`), `Tuner.retile` times each on the layer's own shape,
one work item of synthetic data on one thread, the candidates taking turns, and keeps the
fastest where it beats the derived tile by a margin (`chosen`). The choice is cached
beside the kernel cache, in `tuning/<target fingerprint>.json` under the dtype, so it costs
once per machine, and a choice made on another CPU (another fingerprint) is never read; a
file that cannot be parsed is measured again, with a warning.

A tile never changes a number: every output is one chain of multiply-adds over the window
and the input channels in one order whatever the tile, and a conv that sums its output sums
fixed blocks of pixels whatever its rows (`slots.BlockSums`). Such a conv keeps the derived
tile all the same: its epilogue (the sums, and in place the memory it moves) sets its pace,
and its candidates' rates differed by 2-3% (ResNet-164's stage-1 layers, Zen 4) for a compile
each. `tune=False` (or RESCOMPILE_TUNE=0 in the environment: the tests, CI) keeps every
derived tile without measuring.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from ...errors import ResourceError
from ...kernel_cache import cache_root, write_cache_file
from ...precision import ITEMSIZE, numpy_dtype
from .arena import Layout, aligned_empty
from .llvm import abi
from .llvm.conv import ConvKernel
from .llvm.wgrad import WgradKernel
from .steps import Step
from .target import cache_bytes
from .tuning import (MIN_TILE_ROWS, POINTER_ROWS, WGRAD_GROUPS, conv_tile, images_per_item,
                     tile_rows)
from .weights import pack_weights, transformed
from .winograd import WEIGHT_TAPS

_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
MAX_VECTORS = 4  # the widest tile tried: 4 vectors of channels
# What the choices in a file were measured on. A file of another format holds choices an
# older tuner made (format 1 timed a small map's layers on calls of more images than the
# schedule gives them; format 2 timed candidates one after the other and took the fastest
# by any margin), so its layers are measured again.
FORMAT = 3
TIMED_ROUNDS = 15  # rounds of one call of every candidate; a candidate's best is its time
# A tile other than the derived one is kept only where it is this much faster: timed in turns,
# one layer's rate of 4x24 over 6x16 still spread 2-5% either side of its median (10th to
# 90th percentile over 36 timings of each of ResNet-164's layers, Zen 3), where candidates
# that close made a whole model's time move by several percent from one compile to the next.
TILE_MARGIN = 0.05


def tuning_enabled(tune: bool | None) -> bool:
    """`tune` as given, else the environment's RESCOMPILE_TUNE (on unless "0")."""
    return os.environ.get("RESCOMPILE_TUNE", "1") != "0" if tune is None else tune


def candidates(target, dtype: str, channels: int, depth: int | None = None,
               widens: bool = False, pixels: int | None = None) -> list[tuple[int, int]]:
    """The tiles worth trying for `channels` output channels: the derived one, and 2 to
    MAX_VECTORS vectors wide where the channels fill that many vectors, each with the most
    rows it allows, with rows that divide a weight gradient's `depth` or a conv's `pixels`
    an image (`tuning.tile_rows`), and with no more rows than leave their pointers in
    registers (POINTER_ROWS); a kernel that `widens` its broadcast input leaves it its
    registers in every one."""
    tiles = [conv_tile(target, dtype, channels, depth, widens, pixels)]
    widths = [tiles[0][1]] + [nv for nv in range(2, MAX_VECTORS + 1)
                              if nv * target.lanes(dtype) <= channels]
    for nv in widths:
        rows = tile_rows(target, nv, widens=widens)
        tiles += [(rows, nv), (tile_rows(target, nv, depth, widens, pixels), nv),
                  (min(rows, POINTER_ROWS), nv)]
    return list(dict.fromkeys(tile for tile in tiles if tile[0] >= MIN_TILE_ROWS))


class Tuner:
    """Chooses the tiles of one program's conv steps (`retile`). `address(kernel)` compiles
    or loads a kernel; `measure=False` keeps the derived tiles; `fresh` re-measures what the
    cache holds (`rescompile tune`)."""

    def __init__(self, target, dtype: str, cache_dir, measure: bool, address, fresh=False):
        self.target, self.dtype, self.cache_dir = target, dtype, cache_dir
        self.measure, self.address, self.fresh = measure, address, fresh
        self.measured = 0  # candidates timed by this tuner (the tests count them)
        self._choices: dict | None = None

    @property
    def path(self) -> Path:
        return cache_root(self.cache_dir) / "tuning" / f"{self.target.fingerprint}.json"

    def retile(self, steps: list, layouts: dict[str, Layout]):
        """The steps with their tiles chosen, and (step name, why) for each tiled step."""
        out, remarks = [], []
        for step in steps:
            if isinstance(step, Step) and isinstance(step.kernel, (ConvKernel, WgradKernel)):
                (mr, nv), why = self._choose(step, layouts)
                step = retiled(step, mr, nv)
                remarks.append((step.name, f"tile {mr}x{step.kernel.nr}: {why}"
                                           f"{_panel_order(step)}"))
            out.append(step)
        return out, remarks

    def _choose(self, step: Step, layouts) -> tuple[tuple[int, int], str]:
        kernel = step.kernel
        wgrad = isinstance(kernel, WgradKernel)
        depth = step.fields["kh"] * step.fields["kw"] * step.fields["cin"] if wgrad else None
        tiles = candidates(self.target, self.dtype, step.channels, depth, kernel.widens,
                           None if wgrad else step.pixels)
        derived = (kernel.mr, kernel.nv)
        if getattr(kernel, "sums", None) is not None:
            return derived, "derived (it sums its output: its epilogue sets its pace)"
        if getattr(kernel, "dot", None) == "amx":
            return derived, "derived (AMX tiles)"
        if len(tiles) == 1:
            return derived, "derived (the only tile that fits its channels)"
        if not self.measure:
            return derived, "derived (tuning off)"
        key = _layer_key(step, layouts)
        choices = self._cached()
        if self.fresh or key not in choices:
            lanes = self.target.lanes(self.dtype)
            rates = self._rates({tile: retiled(step, *tile) for tile in tiles}, layouts)
            choices[key] = {"tile": list(chosen(rates, derived)),
                            "gflops": {f"{m}x{n * lanes}": round(r, 1)
                                       for (m, n), r in rates.items()}}
            self._store()
        choice = choices[key]
        rates = ", ".join(f"{t} {g} GFLOP/s" for t, g in choice["gflops"].items())
        tile = tuple(choice["tile"])
        kept = f" (the derived tile: no other {TILE_MARGIN:.0%} faster)" \
            if tile == derived and len(choice["gflops"]) > 1 else ""
        return tile, f"measured: {rates}{kept}"

    # -- the cache of choices -----------------------------------------------------------------
    def _cached(self) -> dict:
        """This dtype's choices from the cache file (an unreadable file: none, and a warning;
        one of another FORMAT: none)."""
        if self._choices is None:
            self._choices = {}
            try:
                text = self.path.read_text()
            except OSError:
                return self._choices
            try:
                doc = json.loads(text)
                if doc.get("format") == FORMAT and self.dtype in doc["choices"]:
                    self._choices = _valid(doc["choices"][self.dtype])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                warnings.warn(f"{self.path}: tuning choices unreadable ({exc}); measuring "
                              f"again", RuntimeWarning, stacklevel=2)
        return self._choices

    def _store(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            doc["choices"] = dict(doc["choices"]) if doc.get("format") == FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            doc = {"target": dataclasses.asdict(self.target), "choices": {}}
        doc["format"] = FORMAT
        doc["choices"][self.dtype] = self._choices
        try:
            write_cache_file(cache_root(self.cache_dir), f"tuning/{self.path.name}",
                             json.dumps(doc, indent=1, sort_keys=True).encode())
        except ResourceError as exc:
            warnings.warn(f"tuning choices not kept: {exc}", RuntimeWarning, stacklevel=2)

    # -- measuring ----------------------------------------------------------------------------
    def _rates(self, steps: dict, layouts) -> dict:
        """GFLOP/s of each tile's step (`steps`: tile -> the step retiled) on random data: on
        one work item (a reduction's: one chunk) and, where a work item is several images,
        on one image too (batch 1's calls), the rate over both. The candidates take turns,
        one call each a round for TIMED_ROUNDS rounds, and each call's best time counts: a
        burst of other load on the shared machine then slows every candidate alike, where
        candidates timed one after the other took it whole (ResNet-164's layers on a Zen 3:
        one layer's rate of 4x24 over 6x16 ranged 0.6x-1.5x from one timing to the next,
        and 0.86x-1.08x timed in turns)."""
        self.measured += len(steps)
        calls = {tile: [_TimedCall(step, layouts, images, pixels, self.address(step.kernel))
                        for images, pixels in _call_sizes(step)]
                 for tile, step in steps.items()}
        for call in (call for every in calls.values() for call in every):
            call.seconds()  # its code and data into the caches
        best = {tile: [float("inf")] * len(every) for tile, every in calls.items()}
        for _ in range(TIMED_ROUNDS):
            for tile, every in calls.items():
                best[tile] = [min(b, call.seconds()) for b, call in zip(best[tile], every)]
        return {tile: sum(call.flops for call in calls[tile]) / sum(best[tile]) / 1e9
                for tile in steps}


def chosen(rates: dict, derived: tuple[int, int]) -> tuple[int, int]:
    """The fastest tile where it beats the derived one by more than TILE_MARGIN, else the
    derived one: near-equal tiles then never trade places from one compile to the next."""
    fastest = max(rates, key=rates.get)
    return fastest if rates[fastest] > rates[derived] * (1 + TILE_MARGIN) else derived


def _call_sizes(step: Step) -> list[tuple[int, int]]:
    """(images, pixels) of each call a step's tile is timed on (`Tuner._rates`)."""
    if step.fixed_chunk:
        images = -(-step.fixed_chunk // step.pixels)
        return [(images, min(images * step.pixels, step.fixed_chunk))]
    return [(images, images * step.pixels)
            for images in sorted({1, images_per_item(step.output_pixels)})]


class _TimedCall:
    """One call of a step's kernel on `images` images of random data, `pixels` of them."""

    def __init__(self, step: Step, layouts, images: int, pixels: int, address: int):
        consts, pointers, self._keep = step_arguments(step, layouts, images)
        self._call = _CALL(address)
        self._args = (consts.ctypes.data, pointers.ctypes.data, 0, pixels, 0, step.channels)
        self._keep += [consts, pointers]
        self.flops = step.flops * pixels / step.pixels

    def seconds(self) -> float:
        start = time.perf_counter()
        self._call(*self._args)
        return time.perf_counter() - start


def retiled(step: Step, mr: int, nv: int) -> Step:
    """The step with an MR x NV tile: a conv's weights packed for that width, a weight
    gradient's channels cut in that many panels."""
    kernel = dataclasses.replace(step.kernel, mr=mr, nv=nv)
    if isinstance(kernel, WgradKernel):
        return dataclasses.replace(step, kernel=kernel, channel_align=kernel.nr,
                                   groups=min(-(-step.channels // kernel.nr), WGRAD_GROUPS))
    uses = dict(step.uses, w=dataclasses.replace(step.uses["w"], nr=kernel.nr))
    # a Winograd tile's scratch, and staged rows, grow with the tile
    return dataclasses.replace(step, kernel=kernel, uses=uses, pixel_align=mr,
                               channel_align=kernel.nr,
                               scratch=kernel.scratch_for(step.fields, step.channels))


def _panel_order(step: Step) -> str:
    """Why a conv runs tiles or panels outer (`tuning.panels_outer`)."""
    if "panels_outer" not in step.fields:
        return ""
    fields = step.fields
    weights = fields["kh"] * fields["kw"] * fields["cin"] * step.channels \
        * ITEMSIZE[step.kernel.element("w")]
    order = "panels outer" if fields["panels_outer"] else "tiles outer"
    staged = ", its rows staged once a tile" if getattr(step.kernel, "stages_rows", False) \
        else ""
    return f"; {order} (weights {weights >> 10} KiB, L2 {cache_bytes(2) >> 10} KiB{staged})"


def _layer_key(step: Step, layouts) -> str:
    """What a tile's speed depends on: the kernel apart from its tile, and the shapes."""
    kernel = dataclasses.replace(step.kernel, mr=0, nv=0)
    shape = layouts[step.tensors["x"]]
    fields = ",".join(f"{k}={v}" for k, v in sorted(step.fields.items())
                      if not callable(v) and not k.startswith("e"))
    return f"{kernel.symbol}|x={shape.h}x{shape.w}x{shape.c}|{fields}"


def _valid(choices) -> dict:
    for key, choice in choices.items():
        tile = choice["tile"]
        if not (isinstance(key, str) and len(tile) == 2 and all(isinstance(t, int) and t > 0
                                                                for t in tile)):
            raise ValueError(f"bad choice for {str(key)[:60]!r}")
    return dict(choices)


def step_arguments(step: Step, layouts, images: int):
    """Random tensors for the step's signature, its fields, and the pointer block. A
    per-channel vector is of the step's channels, or a prologue's of its input channels."""
    rng = np.random.default_rng(0)
    kernel = step.kernel
    of_inputs = {o.role for o in kernel.prologue_chain.operands} \
        if getattr(kernel, "prologue", ()) else set()
    keep, addresses, words = [], [], []
    values = {n: v(images) if callable(v) else v for n, v in step.fields.items()}
    values.update(abi.placed_values(kernel.signature))  # through the caches
    for role, value in step.tensors.items():
        lay = layouts[value]
        values.update({f"{role}.image": lay.image, f"{role}.row": lay.row,
                       f"{role}.pixel": lay.c})
    for pointer in kernel.signature.pointers:
        use, kind, start = step.uses[pointer.role], numpy_dtype(pointer.dtype), 0
        if use.how == "packed":
            k = WEIGHT_TAPS if "winograd" in use.transform else values["kh"]
            weights = rng.standard_normal((k, k, values["cin"], step.channels))
            array = pack_weights(transformed(weights, use.transform), use.nr,
                                 dtype=pointer.dtype, layout=use.layout)
        elif use.how == "scratch":
            array = aligned_empty(step.scratch).view(kind)  # on a line, as the arena's
        elif use.value in step.slots:  # a reduction's float64 slots
            array = np.zeros(step.slots[use.value].slot_bytes // 8)
        elif pointer.role in step.tensors:  # where the arena would point: data, or window
            lay = layouts[step.tensors[pointer.role]]
            array = aligned_empty(images * lay.image * kind.itemsize).view(kind)
            array[:] = rng.standard_normal(array.size)
            start = lay.window(*use.pads) if use.how == "window" else lay.data
        else:  # a per-channel vector
            channels = values["cin"] if pointer.role in of_inputs else step.channels
            array = rng.uniform(0.5, 1.5, channels).astype(kind)
        keep.append(array)
        addresses.append(array.ctypes.data + start * kind.itemsize)
    for f in kernel.signature.fields:
        value = values[f.name]
        words.append(np.float64(value).view(np.int64) if f.kind == "scalar" else int(value))
    return np.array(words, np.int64), np.array(addresses, np.int64), keep
