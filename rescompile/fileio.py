"""Files rescompile writes: atomically, so that a crash or a concurrent writer never leaves a
torn file; and outputs checked writable before the work that fills them. (The kernel cache's
files: `kernel_cache.py`.)"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ResourceError


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
