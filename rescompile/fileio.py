"""Files rescompile writes: atomically (so a crash or a concurrent writer never leaves a torn
file), and generated modules, which are imported from a cache directory so Numba can cache
their compiled code beside them.

Cache directory: the explicit argument, else $RESCOMPILE_CACHE_DIR, else
$XDG_CACHE_HOME/rescompile, else ~/.cache/rescompile. Its contents are trusted code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

_modules: dict[str, object] = {}  # file path -> module, so each is imported once per process


def atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_root(explicit=None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("RESCOMPILE_CACHE_DIR"):
        return Path(os.environ["RESCOMPILE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rescompile"


def generated_module(source: str, path: Path, name: str):
    """Import the module whose text is `source` from `path` as `name`, writing the file if it is
    missing or different (two processes may race here: both write the same text atomically).
    Numba's cache remembers the module name, so a file must always be imported as one name."""
    module = _modules.get(str(path))
    if module is None:
        if not path.exists() or path.read_text() != source:
            atomic_write(path, lambda f: f.write(source.encode()))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[str(path)] = module
    return module
