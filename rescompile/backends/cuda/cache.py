"""The CUDA backend's entries in the kernel cache (`kernel_cache.py`): generated modules.

Numba caches compiled code only for functions defined in a real file, so each generated kernel
source becomes `<cache>/cuda/k_<key>.py` and is imported from there; `@cuda.jit(cache=True)`
then keeps the machine code beside it. The key is the kernel cache's rule over the source, so
identical kernels share one file and a new toolchain never loads stale code.
"""

from __future__ import annotations

from ...kernel_cache import cache_root, generated_module, key


def load_kernel(source: str, directory=None):
    """The `kernel` function of a generated module, writing and importing it once."""
    stem = f"k_{key(source)[:32]}"
    return generated_module(source, cache_root(directory), f"cuda/{stem}.py",
                            f"rescompile_cuda_{stem}").kernel
