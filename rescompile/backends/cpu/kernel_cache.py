"""Load generated kernel source as a real module so Numba can cache it on disk.

Design note
-----------
``cache=True`` does not work for functions made by ``exec()`` (Numba finds no
source file to key its cache on).  So each generated source is written to
``<cache dir>/rk_<sha256>.py`` and imported from there; Numba keeps its cache
files beside it in ``__pycache__``, and a second process imports the same file
and loads machine code instead of compiling (30 kernels: 14 s cold, 0.5 s warm
in NUMBA-NOTES).

The file name hashes the source together with the numba and llvmlite versions
and the text of ``blas.py`` (generated kernels inline its GEMM wrapper; Numba
does not track that dependency itself).  Files are written atomically (temp
file in the same directory, then ``os.replace``), so concurrent processes
either see no file or a complete one.

Cache directory: the ``cache_dir`` argument, else ``$RESCOMPILE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/rescompile``, else ``~/.cache/rescompile``.
"""

import hashlib
from pathlib import Path

import llvmlite
import numba

from ...fileio import cache_root, generated_module

_BLAS_SOURCE = Path(__file__).with_name("blas.py").read_bytes()


def source_digest(source):
    """sha256 of the source plus everything the compiled code depends on."""
    h = hashlib.sha256()
    # The optimisation level is not in Numba's own cache key: code compiled at NUMBA_OPT=0
    # (the test suite's setting) must never be loaded by a process that expects full speed.
    for part in (source.encode(), numba.__version__.encode(), str(numba.config.OPT).encode(),
                 llvmlite.__version__.encode(), _BLAS_SOURCE):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()


def compile_source(fn_name, source, cache_dir=None):
    """Write ``source`` to the cache directory, import it, return ``fn_name`` from it.

    ``source`` must be a complete module whose kernels are decorated with
    ``@numba.njit(cache=True, ...)``.  Compilation happens at the first call
    (or is loaded from Numba's cache).
    """
    digest = source_digest(source)
    path = cache_root(cache_dir) / f"rk_{digest}.py"
    return getattr(generated_module(source, path, f"rescompile_kernel_{digest[:32]}"), fn_name)
