"""The kernel cache, shared by the generated-code backends: where it is, the one key rule for
its entries, and how entries are written, recorded, imported and repaired.

Where: the explicit argument, else $RESCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/rescompile,
else ~/.cache/rescompile. Its contents are trusted code (DESIGN: "Trust"). One that cannot be
written is replaced, for the process, by one private temporary directory (a warning says so),
removed when the process exits (or, if it was killed, by the next process that falls back):
compiling still works, only nothing is kept for the next run.

Keys: `key(*parts)` is the sha256 of the toolchain that compiles an entry (numba, llvmlite)
and of the parts that decide its code, which each backend names: the CPU backend a kernel's
signature, the target CPU's fingerprint and the generator's own source; the CUDA backend the
generated module's source. An entry made by another toolchain, generator or CPU is never
found, let alone loaded.

Files: written atomically and listed in `RECORD`, so `rescompile cache clear` removes only
what rescompile wrote. Generated Python modules (CUDA) are imported from the cache so that
Numba keeps their machine code beside them; a Numba cache file that cannot be read is
emptied and the code compiled again (`repairing_numba_cache`).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from functools import lru_cache
from pathlib import Path

import llvmlite
import numba

from .fileio import alive, atomic_write

RECORD = "rescompile-files.txt"
_modules: dict[str, object] = {}  # file path -> module, so each is imported once per process


def key(*parts: str) -> str:
    """An entry's key: what compiles it, then what its code is a function of."""
    digest = hashlib.sha256()
    for part in (f"numba {numba.__version__}", f"llvmlite {llvmlite.__version__}", *parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def configured_cache_dir(explicit=None) -> Path:
    """The cache directory as configured, whether or not it exists."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("RESCOMPILE_CACHE_DIR"):
        return Path(os.environ["RESCOMPILE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rescompile"


def cache_root(explicit=None) -> Path:
    """The cache directory to write to: the configured one if it can be written, else this
    process's private fallback."""
    return _usable(configured_cache_dir(explicit).absolute())


@lru_cache(maxsize=None)
def _usable(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return path
    except OSError as exc:
        fallback = _private_cache()
        warnings.warn(f"{path}: kernel cache directory unusable ({exc.strerror or exc}); "
                      f"this process caches in {fallback}", RuntimeWarning, stacklevel=3)
        return fallback


FALLBACK_PREFIX = "rescompile-cache-"


@lru_cache(maxsize=None)
def _private_cache() -> Path:
    """This process's one fallback cache, removed when it exits; those of processes that
    were killed (no exit handler ran) are removed now."""
    for stale in Path(tempfile.gettempdir()).glob(f"{FALLBACK_PREFIX}*-*"):
        pid = stale.name[len(FALLBACK_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{FALLBACK_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_cache_file(root: Path, relative: str, data: bytes) -> Path:
    """Write a cache entry atomically and record it as rescompile's own."""
    path = root / relative
    atomic_write(path, lambda f: f.write(data))
    with open(root / RECORD, "a") as record:  # one short append: atomic between processes
        record.write(relative + "\n")
    return path


def recorded_files(root: Path) -> list[Path]:
    """The files rescompile wrote to `root` that are still there (each listed once). Entries
    that leave the directory are ignored: the record is trusted no further than it."""
    try:
        lines = (root / RECORD).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in dict.fromkeys(lines):
        path = root / line
        if line and not Path(line).is_absolute() and ".." not in Path(line).parts and \
                path.is_file():
            found.append(path)
    return found


def generated_module(source: str, root: Path, relative: str, name: str):
    """Import the module whose text is `source` from `root / relative` as `name`, writing the
    file if it is missing or different (two processes may race here: both write the same text
    atomically). Numba's cache remembers the module name, so a file must always be imported
    as one name."""
    path = root / relative
    module = _modules.get(str(path))
    if module is None:
        if not path.exists() or path.read_text(errors="replace") != source:
            write_cache_file(root, relative, source.encode())
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[str(path)] = module
    return module


def repairing_numba_cache(dispatchers, call):
    """`call()`, once more after emptying the dispatchers' Numba caches if Numba failed to read
    one of its cache files (truncated, corrupt): with a warning, the code is compiled again
    instead of the error coming back on every run until the cache is cleared."""
    try:
        return call()
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        if not any(Path(f.filename).match("numba/core/caching.py") for f in frames):
            raise
        warnings.warn(f"Numba's cache of {dispatchers[0].py_func.__module__} could not be read "
                      f"({type(exc).__name__}: {exc}); compiling again", RuntimeWarning,
                      stacklevel=2)
        for dispatcher in dispatchers:
            dispatcher._cache.flush()
        return call()
