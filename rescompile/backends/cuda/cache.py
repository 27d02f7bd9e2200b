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
import importlib.util
import os
import tempfile
from pathlib import Path

import numba

_modules: dict[str, object] = {}  # file path -> imported module, once per process


def cache_dir(explicit=None) -> Path:
    if explicit is not None:
        base = Path(explicit)
    elif os.environ.get("RESCOMPILE_CACHE_DIR"):
        base = Path(os.environ["RESCOMPILE_CACHE_DIR"])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "rescompile"
    return base / "cuda"


def digest(source: str) -> str:
    return hashlib.sha256(f"{numba.__version__}\0{source}".encode()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_kernel(source: str, directory=None):
    """The `kernel` function of a generated module, writing and importing it once."""
    folder = cache_dir(directory)
    path = folder / f"k_{digest(source)[:32]}.py"
    module = _modules.get(str(path))
    if module is None:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != source:
            _write_atomically(path, source)
        spec = importlib.util.spec_from_file_location(f"rescompile_cuda_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[str(path)] = module
    return module.kernel
