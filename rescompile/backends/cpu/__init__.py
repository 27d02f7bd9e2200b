"""The CPU backend: inference on micro-kernels written in LLVM IR, driven by one Numba
function (`program.py`); training on generated Numba kernels (`train_program.py`)."""

import numba

# NUMBA-NOTES: OpenMP threads and OpenBLAS threads fight on 2 cores; workqueue does not.
numba.config.THREADING_LAYER = "workqueue"

from .program import CpuProgram  # noqa: E402


def compile_program(graph, entries, dtype: str, cache_dir=None, check_finite: bool = False,
                    isa: str | None = None, **_options):
    """`isa` ("avx512", "avx2", "portable") overrides the host's instruction set for the
    micro-kernels (it must run here)."""
    if "prepare" in entries:
        return CpuProgram(graph, entries, dtype, cache_dir=cache_dir, check_finite=check_finite,
                          isa=isa)
    # Imported here: the training kernels bring SciPy's BLAS, which inference never needs.
    from .train_program import TrainProgram
    return TrainProgram(graph, entries, dtype, cache_dir=cache_dir, check_finite=check_finite)
