"""The CUDA backend: the optimised IR compiled to numba.cuda kernels.

    graph --plan.py--> launches (generated kernel source per distinct op + shapes + dtype +
    epilogue; kernels.py maps each op to its generator) --cache.py--> kernel modules on disk
    --program.py--> bound to device memory (memory.py) and run.

Runs on an NVIDIA GPU, or on Numba's CUDA simulator with NUMBA_ENABLE_CUDASIM=1 (set before
numba is imported; tests use tiny shapes). Options: `cache_dir`, `return_device` (fetch device
arrays instead of numpy), `target` (launch sizes, target.GPU or target.SIMULATOR),
`reuse_memory` (False: no buffer sharing between activations, for differential tests).
"""

from __future__ import annotations

from ...errors import UsageError
from ...precision import BFLOAT16
from . import device
from .device import CudaUnavailableError
from .kernels import UnsupportedOpError, supports
from .plan import count_launches
from .program import CudaProgram
from .target import GPU, SIMULATOR

__all__ = ["compile_program", "count_launches", "CudaProgram", "CudaUnavailableError",
           "UnsupportedOpError", "supports"]


def compile_program(graph, entries, dtype: str = "float32", cache_dir=None,
                    return_device: bool = False, target=None,
                    reuse_memory: bool = True) -> CudaProgram:
    if dtype == BFLOAT16:
        raise UsageError("the cuda backend does not run bfloat16 yet; use float32, or "
                         "backend='cpu' or 'reference' for bfloat16")
    device.require_device()
    if target is None:
        target = SIMULATOR if device.simulated() else GPU
    return CudaProgram(graph, entries, dtype, target, cache_dir, return_device, reuse_memory)
