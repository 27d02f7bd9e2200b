"""Where kernels run: availability checks, device buffers and host<->device copies.

Everything that touches `numba.cuda` memory lives here, so the rest of the backend only
deals in flat device arrays. Under the simulator (`NUMBA_ENABLE_CUDASIM=1`) device arrays
are `FakeCUDAArray`s and there is no `as_cuda_array`; `as_device` accepts both worlds.
"""

from __future__ import annotations

import numpy as np
from numba import config, cuda

from ... import resources
from ...errors import DeviceError, ResourceError


class CudaUnavailableError(DeviceError, RuntimeError):
    """backend='cuda' was asked for on a machine without a usable GPU."""


def simulated() -> bool:
    return bool(config.ENABLE_CUDASIM)


def available() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install raises from is_available itself
        return False


def require_device() -> None:
    if not available():
        raise CudaUnavailableError(
            "backend 'cuda' needs an NVIDIA GPU with a working driver, or "
            "NUMBA_ENABLE_CUDASIM=1 (set before numba is imported) for the simulator")


def check_fits(nbytes: int, what: str) -> None:
    """Refuse a plan larger than the device's free memory before allocating any of it."""
    if simulated():
        resources.check_fits(nbytes, what)
        return
    free, _ = cuda.current_context().get_memory_info()
    if nbytes > free:
        raise ResourceError(f"{what} need {nbytes / resources.GIB:.1f} GiB; the GPU has "
                            f"{free / resources.GIB:.1f} GiB free")


def synchronize() -> None:
    cuda.synchronize()


def describe() -> dict:
    """The card and the CUDA stack it runs on, for benchmark records."""
    if simulated():
        return {"device": "numba cuda simulator"}
    from numba.cuda.cudadrv.driver import driver
    card = cuda.get_current_device()
    return {"device": card.name.decode() if isinstance(card.name, bytes) else str(card.name),
            "compute_capability": list(card.compute_capability),
            "driver_cuda_version": ".".join(map(str, driver.get_version())),
            "runtime_version": ".".join(map(str, cuda.runtime.get_version()))}


def is_device_array(obj) -> bool:
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    return simulated() and type(obj).__name__ == "FakeCUDAArray"


def as_device(obj):
    """A device array viewing `obj` (no copy): numba's own, or via __cuda_array_interface__."""
    if simulated() or cuda.devicearray.is_cuda_ndarray(obj):
        return obj
    return cuda.as_cuda_array(obj)


def empty(size: int, dtype: str):
    return cuda.device_array(max(size, 1), dtype=np.dtype(dtype))


def flat(array):
    """A 1-D view of a contiguous device array (kernels index everything flat)."""
    return array.reshape(array.size) if array.ndim != 1 else array


def upload_into(target, value, dtype: str, name: str) -> None:
    """Copy a host or device array into an existing flat device buffer of the same size."""
    if is_device_array(value):
        source = flat(as_device(value))
        if np.dtype(source.dtype) != np.dtype(dtype):
            raise TypeError(f"{name}: device array is {source.dtype}, program is {dtype}")
    else:
        source = np.ascontiguousarray(value, dtype=dtype).reshape(-1)
    if source.size != target.size:
        raise ValueError(f"{name}: {source.size} elements given, {target.size} expected")
    target.copy_to_device(source)


def freeze(value) -> None:
    """Make a host array we mirror on the device read-only: an in-place edit would otherwise
    leave the device copy silently stale (the mirror is keyed by the array's identity)."""
    if isinstance(value, np.ndarray) and value.base is None and value.flags.writeable:
        value.flags.writeable = False
