"""The CPU backend: generated Numba kernels, cached on disk, driven by generated code."""

import numba

# NUMBA-NOTES: OpenMP threads and OpenBLAS threads fight on 2 cores; workqueue does not.
numba.config.THREADING_LAYER = "workqueue"

from .program import CpuProgram  # noqa: E402


def compile_program(graph, entries, dtype: str, cache_dir=None, check_finite: bool = False,
                    fuse_units: bool = True, **_options) -> CpuProgram:
    """`fuse_units=False` lowers every node on its own (no cross-layer unit kernels)."""
    return CpuProgram(graph, entries, dtype, cache_dir=cache_dir, check_finite=check_finite,
                      fuse_units=fuse_units)
