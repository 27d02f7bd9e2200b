"""Files rescompile reads and writes.

Reads: every input path must name a regular file, checked on the open file itself (opened
without blocking), so `/dev/zero` is not read until memory runs out and a FIFO does not hang
the process; `read_bounded` then reads at most a limit the caller derives from what the file
can legitimately hold. Each refusal is one error of the caller's kind naming the file.

Writes: atomically, so that a crash or a concurrent writer never leaves a torn file; the
temporary file names the host and process that write it, so one left by a killed process is
removed by the next write to the same path; and outputs are checked writable before the work
that fills them. (The kernel cache's files: `kernel_cache.py`.)
"""

from __future__ import annotations

import glob
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

from .errors import InputError, ResourceError, UsageError
from .resources import available_bytes

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _checked_path(path, what: str) -> Path:
    try:
        return Path(os.fspath(path))
    except TypeError:
        raise UsageError(f"{what}: expected a path, got {type(path).__name__}") from None


def open_regular(path, what: str, error=InputError):
    """`path` opened for binary reading, if it is a regular file; else `error` naming it and
    what it is. Opened with O_NONBLOCK, so that opening a FIFO returns at once, and checked
    with fstat on the open file, so that the path cannot change in between."""
    path = _checked_path(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {_kind(mode)}, not a regular {what} file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def regular_file(path, what: str, error=InputError) -> Path:
    """`path`, checked as `open_regular` checks it, for a library that opens paths itself."""
    open_regular(path, what, error).close()
    return _checked_path(path, what)


def read_bounded(path, what: str, limit: int, why: str, error=InputError) -> bytes:
    """The bytes of the regular file at `path`, refused without reading it if it holds more
    than `limit` bytes (`why` says where the limit comes from), and never more than limit + 1
    read should it grow meanwhile."""
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise error(f"{path}: larger than {limit} bytes, too large for a {what} file ({why})")
    return data


def memory_limit() -> int:
    """What a data file read whole may hold: half the memory available now, leaving room
    for the arrays made from it."""
    return available_bytes() // 2


def atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, then rename it into place.
    A path that cannot be written (a directory, no permission, a full disk) is one error that
    names it."""
    path = Path(path)
    _refuse_special(path, "output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, glob.escape(path.name))
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp",
                                   dir=path.parent)
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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def remove_stale_temporaries(directory: Path, name: str = "*") -> None:
    """Remove the temporary files of writes into `directory` (to files matching the glob
    `name`) by processes of this host that are gone: killed during a write. A live writer's,
    or another host's (a shared file system), are left alone."""
    ours = re.compile(rf"\..+\.{re.escape(socket.gethostname())}-(\d+)\.[^.]+\.tmp")
    for candidate in directory.glob(f".{name}.*.tmp"):
        found = ours.fullmatch(candidate.name)
        if found and not alive(int(found.group(1))):
            candidate.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process `pid` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _refuse_special(path: Path, what: str) -> None:
    """An output must be a regular file or nothing yet: renaming a file over a device or a
    FIFO would replace it (`/dev/null`!), and a directory cannot be replaced."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ResourceError(f"{what} {path}: cannot write: {_kind(mode)}, not a regular file")


def check_writable(path, what: str) -> None:
    """Refuse an output path that will not take a file, before the work that makes it: a
    directory, a device or FIFO (renaming a file over `/dev/null` would replace it), or a
    place that cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    _refuse_special(path, what)
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ResourceError(f"{what} {path}: {existing} cannot be written")
