"""Files rescompile writes: atomically (so a crash or a concurrent writer never leaves a torn
file), into a cache directory that keeps a record of them, and generated modules, which are
imported from that directory so Numba can cache their compiled code beside them.

Cache directory: the explicit argument, else $RESCOMPILE_CACHE_DIR, else
$XDG_CACHE_HOME/rescompile, else ~/.cache/rescompile. Its contents are trusted code. One that
cannot be written is replaced, for the process, by a private temporary directory (a warning
says so): compiling still works, only nothing is kept for the next run. Every file rescompile
puts there is listed in its `RECORD`, and `rescompile cache clear` removes only those.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import traceback
import warnings
from functools import lru_cache
from pathlib import Path

from .errors import ResourceError

RECORD = "rescompile-files.txt"
_modules: dict[str, object] = {}  # file path -> module, so each is imported once per process


def atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, then rename it into place.
    A path that cannot be written (a directory, no permission, a full disk) is one error that
    names it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ResourceError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ResourceError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path, what: str) -> None:
    """Refuse an output path that will not take a file, before the work that makes it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ResourceError(f"{what} {path}: is a directory")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ResourceError(f"{what} {path}: {existing} cannot be written")


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
        fallback = Path(tempfile.mkdtemp(prefix="rescompile-cache-"))
        warnings.warn(f"{path}: kernel cache directory unusable ({exc.strerror or exc}); "
                      f"this process caches in {fallback}", RuntimeWarning, stacklevel=3)
        return fallback


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
