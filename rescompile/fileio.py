"""Files rescompile writes: atomically, so that a crash or a concurrent writer never leaves a
torn file; and outputs checked writable before the work that fills them. (The kernel cache's
files: `kernel_cache.py`.) Files it reads from a user: regular files only (a FIFO or a device
would block or never end), and no more bytes than the caller can hold."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import InputError, ResourceError


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


def regular_file(path, what: str) -> Path:
    """`path` if it names a regular file (after symbolic links); else InputError naming it:
    missing, a directory, a FIFO, a device or a socket."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path}: cannot read ({getattr(exc, 'strerror', None) or exc})"
                         ) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise InputError(f"{what} {path}: is {kind}")
    return path


def read_bounded(path, what: str, limit_bytes: int) -> bytes:
    """The bytes of the regular file `path`, refused (one line naming it) if it holds more than
    `limit_bytes`. Opened without blocking and checked again once open, so a file swapped for
    a FIFO after the check cannot hang the read."""
    path = regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{what} {path}: is not a regular file")
        try:
            data = f.read(limit_bytes + 1)
        except OSError as exc:
            raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit_bytes:
        raise InputError(f"{what} {path}: larger than the {limit_bytes} bytes allowed")
    return data
