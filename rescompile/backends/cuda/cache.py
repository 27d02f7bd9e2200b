"""On-disk cache of generated kernel modules.

Numba caches compiled code only for functions defined in a real file, so each generated kernel
source becomes `<cache>/cuda/k_<sha256>.py` (written atomically: temp file, then os.replace)
and is imported from there; `@cuda.jit(cache=True)` then keeps the machine code beside it.
The name hashes the source and the numba version, so identical kernels share one file and a
new numba never loads stale code.

Cache directory: the `cache_dir` argument, else $RESCOMPILE_CACHE_DIR, else
$XDG_CACHE_HOME/rescompile, else ~/.cache/rescompile; always the `cuda/` folder inside.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba

from ...fileio import cache_root, generated_module


def cache_dir(explicit=None) -> Path:
    return cache_root(explicit) / "cuda"


def digest(source: str) -> str:
    return hashlib.sha256(f"{numba.__version__}\0{source}".encode()).hexdigest()


def load_kernel(source: str, directory=None):
    """The `kernel` function of a generated module, writing and importing it once."""
    stem = f"k_{digest(source)[:32]}"
    return generated_module(source, cache_dir(directory) / f"{stem}.py",
                            f"rescompile_cuda_{stem}").kernel
