"""CudaProgram: binds plans to device memory and runs them.

Host<->device copies happen only here, at the API boundary: data feeds are uploaded into
buffers allocated once per (entry, batch size); variables are uploaded only when the object
fed for them is not the one the device copy mirrors (the runtime passes the same arrays until
they change, and stores the arrays a train step returns, which this program has registered
as already on the device). Fetches come back as numpy arrays, or as device arrays with
`return_device=True`: views of program memory, valid until the entry runs again. Activations
share planned buffers (memory.py), but fetches are kept live to the end of their entry, so a
fetched view is not overwritten by its own run; an updated variable fetched from a grouped
update is a view of the variable arena V, which a later update or upload overwrites.
"""

from __future__ import annotations

import time

from dataclasses import dataclass

import numpy as np

from . import cache, device, kernels
from .memory import variable_layout
from .plan import Plan, build_plan, layout_ref
from ...entries import batch_of, kept_values
from ...errors import InputError
from ...kernel_cache import repairing_numba_cache


@dataclass
class Bound:
    """A plan with its buffers allocated and kernels loaded."""
    plan: Plan
    kernels: list
    values: dict        # value name -> flat device array (arena views and feed buffers)
    fixed: dict         # launch.Ref -> flat device array (regions: scratch pools, arena slices)


class CudaProgram:
    name = "cuda"

    def __init__(self, graph, entries, dtype: str, target, cache_dir=None,
                 return_device: bool = False, reuse_memory: bool = True):
        for entry in entries.values():
            kernels.check_supported(entry.nodes)
        self.graph, self.entries, self.dtype, self.target = graph, entries, dtype, target
        self.cache_dir, self.return_device = cache_dir, return_device
        self.reuse = reuse_memory  # False: every activation its own buffer (differential tests)
        self.layout = variable_layout(graph)
        self.arena = device.empty(self.layout.size, dtype)
        self.launch_counts: dict[str, int] = {}
        self.uploads = 0  # variable uploads, for tests of the mirror
        self._mirrors: dict[str, object] = {}
        self._bound: dict[tuple, Bound] = {}
        self._launched: set = set()  # kernels launched once (loaded from Numba's cache)
        self._saved: dict[str, dict] = {}
        self._batch: dict[str, int | None] = {}
        self._updates = {v: k[4:] for k, v in graph.outputs.items() if k.startswith("new/")}
        self.profile: dict[str, list] | None = None  # node -> [launches, seconds] when profiling

    def start_profile(self) -> None:
        """Time every launch from now on: each is synchronised, so a profiled run is slower
        than a plain one, but its per-node shares are the card's."""
        self.profile = {}

    # -- binding ----------------------------------------------------------------------------
    def _bind(self, entry_name: str, batch) -> Bound:
        """Per (entry, batch size): one activation arena, one scratch pool per dtype and the
        feed buffers, allocated once; every value a view into them (memory.py)."""
        key = (entry_name, batch)
        if key not in self._bound:
            entry = self.entries[entry_name]
            plan = build_plan(self.graph, entry, self.layout, batch, self.dtype, self.target,
                              kept_values(self.entries, entry), self.reuse)
            device.check_fits(sum(plan.device_bytes(self.dtype).values()),
                              f"the cuda backend's buffers for batch {batch}")
            arenas = {"V": self.arena, "A": device.empty(plan.arena, self.dtype)}
            arenas.update({f"scratch/{dtype}": device.empty(size, dtype)
                           for dtype, size in plan.pools.items()})
            region = lambda ref: arenas[ref.name][ref.offset:ref.offset + ref.size]  # noqa: E731
            values = {name: region(ref) for name, ref in plan.views.items()}
            values.update({name: region(layout_ref(self.layout, name))
                           for name in self.layout.slots})
            values.update({name: device.empty(size, self.dtype)
                           for name, size in plan.feeds.items()})
            fixed = {ref: region(ref) for launch in plan.launches for ref in launch.args
                     if ref.kind == "region"}
            loaded = [cache.load_kernel(l.source, self.cache_dir) for l in plan.launches]
            self._bound[key] = Bound(plan, loaded, values, fixed)
            self.launch_counts[entry_name] = len(plan.launches)
        return self._bound[key]

    def device_bytes(self, entry_name: str, batch) -> dict[str, int]:
        """Bytes allocated for one bound (entry, batch): activations, feeds, scratch."""
        return self._bound[(entry_name, batch)].plan.device_bytes(self.dtype)

    def _batch_of(self, entry, feeds) -> int | None:
        batch = batch_of(self.graph, entry, feeds)
        return batch if batch is not None else self._batch.get(entry.after)

    # -- running ----------------------------------------------------------------------------
    def run(self, entry_name: str, feeds: dict) -> dict:
        entry = self.entries[entry_name]
        if entry.after and entry.after not in self._saved:
            raise RuntimeError(f"entry {entry_name!r} reads values of {entry.after!r}; "
                               f"run {entry.after!r} first")
        batch = self._batch_of(entry, feeds)
        bound = self._bind(entry_name, batch)
        env = dict(self._saved.get(entry.after, {}))
        env.update(bound.values)
        for name, value in feeds.items():
            if name in self.layout.slots:
                self._mirror(name, value, env[name])
            elif name in bound.plan.feeds:
                env[name] = self._feed(name, value, bound.values[name])
            elif name in bound.plan.views:  # read from its place in the activation arena
                self._feed(name, value, env[name], copy=True)
        for launch, kernel in zip(bound.plan.launches, bound.kernels):
            args = [env[r.name] if r.kind == "value" else bound.fixed[r] for r in launch.args]
            if self.profile is None:
                self._launch(kernel, launch, args)
            else:
                self._profiled_launch(kernel, launch, args)
        self._saved[entry_name] = env
        self._batch[entry_name] = batch
        results = {name: self._fetch(env[name], bound.plan.shapes[name]) for name in entry.fetches}
        self._adopt_updates(entry, env, results)
        return results

    def _launch(self, kernel, launch, args) -> None:
        if kernel in self._launched:
            kernel[launch.grid, launch.block](*args)
        else:  # the first launch loads the kernel from Numba's cache
            repairing_numba_cache([kernel], lambda: kernel[launch.grid, launch.block](*args))
            self._launched.add(kernel)

    def _profiled_launch(self, kernel, launch, args) -> None:
        device.synchronize()
        start = time.perf_counter()
        self._launch(kernel, launch, args)
        device.synchronize()
        row = self.profile.setdefault(launch.node, [0, 0.0])
        row[0] += 1
        row[1] += time.perf_counter() - start

    def _feed(self, name: str, value, buffer, copy: bool = False):
        """A device array is used where it is, unless `copy`; a host array is uploaded."""
        if device.is_device_array(value):
            array = device.flat(device.as_device(value))
            if array.size != buffer.size:
                raise InputError(f"{name}: {array.size} elements on the device, "
                                 f"{buffer.size} expected")
            if copy:
                buffer.copy_to_device(array)
                return buffer
            return array
        array = np.asarray(value)
        if array.size != buffer.size:
            raise InputError(f"{name}: shape {list(array.shape)} has {array.size} elements, "
                             f"{buffer.size} expected")
        device.upload_into(buffer, array, self.dtype, name)
        return buffer

    def _mirror(self, name: str, value, slot) -> None:
        """Upload a variable unless its device slot already mirrors this very object."""
        if self._mirrors.get(name) is value:
            return
        device.upload_into(slot, value, self.dtype, f"variable {name!r}")
        device.freeze(value)
        self._mirrors[name] = value
        self.uploads += 1

    def _fetch(self, array, shape: tuple):
        if self.return_device:
            return array.reshape(shape) if shape else array
        return array.copy_to_host().reshape(shape)

    def _adopt_updates(self, entry, env, results) -> None:
        """A fetched new value of a variable becomes the variable's device copy, mirroring
        the object returned, so feeding it back next call uploads nothing."""
        for name in entry.fetches:
            variable = self._updates.get(name)
            if variable is None or variable not in self.layout.slots:
                continue
            slot = env[variable]
            if env[name] is not slot:  # not updated in place: copy on the device
                slot.copy_to_device(env[name])
            device.freeze(results[name])
            self._mirrors[variable] = results[name]

    def values(self, entry_name: str) -> dict:
        """Every value of the entry's last run, as host arrays (for tests); values that share a
        planned buffer all read its last occupant."""
        shapes = {n: self.graph.value(n).concrete_shape(self._batch[entry_name])
                  for n in self._saved[entry_name]}
        return {n: a.copy_to_host().reshape(shapes[n]) for n, a in self._saved[entry_name].items()}
