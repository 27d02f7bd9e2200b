"""The CPU backend: micro-kernels written in LLVM IR (`llvm/`), scheduled (`schedule.py`)
and run by one Numba function (`driver.py`), for inference and training alike."""

import numba

# The driver runs on its own pool (`pool.py`), sized by Numba's thread count, whose query
# starts the threading layer's threads: workqueue's sleep, where OpenMP's would spin against
# OpenBLAS's (NUMBA-NOTES).
numba.config.THREADING_LAYER = "workqueue"

from .lower import supports  # noqa: E402
from .program import CpuProgram  # noqa: E402

__all__ = ["compile_program", "supports", "CpuProgram"]


def compile_program(graph, entries, dtype: str, cache_dir=None, check_finite: bool = False,
                    isa: str | None = None, progress: bool = False, tune: bool | None = None,
                    retune: bool = False) -> CpuProgram:
    """`isa` ("avx512", "avx2", "portable") overrides the host's instruction set for the
    micro-kernels (it must run here); `progress` prints what is being compiled; `tune`
    measures the conv tiles a layer admits on first compile (None: unless RESCOMPILE_TUNE=0),
    `retune` measures them again (`autotune.py`)."""
    return CpuProgram(graph, entries, dtype, cache_dir=cache_dir, check_finite=check_finite,
                      isa=isa, progress=progress, tune=tune, retune=retune)
