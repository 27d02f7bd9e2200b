"""On-disk cache of generated kernel modules.

Numba caches compiled code only for functions defined in a real file, so each generated kernel
source becomes `<cache>/cuda/k_<sha256>.py` (written atomically: temp file, then os.replace)
and is imported from there; `@cuda.jit(cache=True)` then keeps the machine code beside it.
The name hashes the source and the numba version, so identical kernels share one file and a
new numba never loads stale code.

Cache directory: `fileio.cache_root` (the `cache_dir` argument, else the configured one);
always the `cuda/` folder inside. Numba's cache of a module that cannot be read is emptied and
the kernel compiled again (`fileio.repairing_numba_cache`).
"""

from __future__ import annotations

import hashlib

import numba

from ...fileio import cache_root, generated_module


def digest(source: str) -> str:
    return hashlib.sha256(f"{numba.__version__}\0{source}".encode()).hexdigest()


def load_kernel(source: str, directory=None):
    """The `kernel` function of a generated module, writing and importing it once."""
    stem = f"k_{digest(source)[:32]}"
    return generated_module(source, cache_root(directory), f"cuda/{stem}.py",
                            f"rescompile_cuda_{stem}").kernel
