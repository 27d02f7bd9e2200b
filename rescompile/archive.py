"""Reading the zip archives rescompile writes (`.npz` checkpoints, `.rcx` artifacts) when they
may come from anyone: member names and declared sizes are checked against bounds (and the
caller's expectations) before anything is decompressed, each array's header is checked
against its member's size before the array is made, and nothing is unpickled.

A zip member's declared size bounds what reading it can produce: Python's zipfile stops there
and then fails the CRC, so a "zip bomb" costs at most what its directory admits to. The
callers bound those declarations by what the member can legitimately hold (a variable's
bytes from the spec, a manifest's size), so a small file that declares gigabytes is refused
before anything is decompressed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .fileio import open_regular
from .resources import GIB, available_bytes

MAX_TOTAL_BYTES = 64 * 2**30  # far above ResNet-152's weights and optimizer slots in float64
ARRAY_DTYPES = ("float32", "float64", "uint8")
# numpy writes a .npy header of 128 bytes for any array rescompile stores (64-byte aligned);
# a member may hold this much beyond its array's data, and no more.
MAX_NPY_HEADER = 4096
# What a stored (uncompressed) zip of arrays holds beyond them: each member's local header and
# directory entry (46 + 30 bytes, the name twice, zip64 extra fields), and the end records.
ZIP_MEMBER_OVERHEAD = 256
ZIP_END_OVERHEAD = 1024
# What a corrupt zip raises from Python's zipfile: its own error, zlib's for a corrupt deflate
# stream, ValueError/EOFError/NotImplementedError for a malformed directory or an unknown
# compression, RuntimeError for an encrypted member.
_CORRUPT = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, NotImplementedError,
            RuntimeError)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npy_bounds(shape, dtype) -> tuple[int, int]:
    """The sizes a `.npy` member of an array of `shape` and `dtype` may declare."""
    data = math.prod(shape) * np.dtype(dtype).itemsize
    return data, data + MAX_NPY_HEADER


def npz_bound(members: dict[str, tuple[int, int]]) -> int:
    """The most a stored `.npz` of those members (name -> bounds) can hold."""
    return ZIP_END_OVERHEAD + sum(most + ZIP_MEMBER_OVERHEAD + 2 * len(name.encode())
                                  for name, (_, most) in members.items())


def _zip(path: Path, data: bytes | None, what: str, error=CheckpointError) -> zipfile.ZipFile:
    source = open_regular(path, what, error) if data is None else io.BytesIO(data)
    try:
        return zipfile.ZipFile(source)
    except BaseException:
        source.close()
        raise


def has_member(path, name: str) -> bool:
    try:
        with _reading(path), _zip(path, None, "checkpoint or artifact") as z:
            return name in z.namelist()
    except CheckpointError:
        return False


def read_members(path: Path, sizes: dict[str, tuple[int, int]] | None = None,
                 data: bytes | None = None, what: str = "checkpoint",
                 error=CheckpointError) -> dict[str, bytes]:
    """Every member of the zip at `path` (or in `data`, read from `path`). With `sizes`
    (name -> (least, most) bytes), the members must be exactly those, each declaring a size
    in its range, before any is decompressed. Problems raise `error` (a data file's are the
    user's input, not a checkpoint's)."""
    with _reading(path, error), _zip(path, data, what, error) as z:
        infos = z.infolist()
        _check_directory(path, infos, sizes)
        return {info.filename: z.read(info) for info in infos}


def read_member(path: Path, name: str, limit: int, what: str = "checkpoint") -> bytes:
    """One member, refused if missing or declared larger than `limit` bytes."""
    with _reading(path), _zip(path, None, what) as z:
        if name not in z.namelist():
            raise CheckpointError(f"{path}: no member {name!r}")
        info = z.getinfo(name)
        if info.file_size > limit:
            raise CheckpointError(f"{path}: member {name!r} declares {info.file_size} "
                                  f"bytes, at most {limit} allowed")
        return z.read(info)


@contextlib.contextmanager
def _reading(path, error=CheckpointError):
    """Whatever reading a corrupt or unreadable zip raises, as one `error`."""
    try:
        yield
    except CheckpointError as exc:
        raise exc if error is CheckpointError else error(str(exc)) from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except _CORRUPT as exc:
        said = str(exc) or type(exc).__name__
        raise error(f"{path}: corrupt archive ({said[:160]})") from None


def _check_directory(path: Path, infos, sizes: dict[str, tuple[int, int]] | None) -> None:
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: a member name appears twice")
    if sizes is not None:
        extra = sorted(set(names) - set(sizes))
        missing = sorted(set(sizes) - set(names))
        if extra or missing:
            what = f"unexpected member {extra[0][:80]!r}" if extra else \
                f"no member {missing[0]!r}"
            raise CheckpointError(f"{path}: {what}")
        for info in infos:
            least, most = sizes[info.filename]
            if not least <= info.file_size <= most:
                expected = f"{least}" if least == most else f"{least} to {most}"
                raise CheckpointError(f"{path}: member {info.filename!r} declares "
                                      f"{info.file_size} bytes, {expected} expected")
    total = sum(info.file_size for info in infos)
    bound = min(MAX_TOTAL_BYTES, available_bytes())
    if total > bound:
        raise CheckpointError(f"{path}: its members declare {total / GIB:.1f} GiB, more than "
                              f"the {bound / GIB:.1f} GiB this machine can read")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(path: Path, sizes: dict[str, tuple[int, int]] | None = None,
             data: bytes | None = None, what: str = "checkpoint", error=CheckpointError,
             dtypes=ARRAY_DTYPES) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` (the file, or its bytes if given), by key, each of `dtypes`;
    its members are checked against `sizes` (as `read_members` does) before any is read."""
    arrays = {}
    for name, member in read_members(path, sizes, data, what, error).items():
        if not name.endswith(".npy"):
            raise error(f"{path}: member {name[:60]!r} is not an array (.npy)")
        arrays[name[:-4]] = parse_npy(path, name, member, error, dtypes)
    return arrays


def parse_npy(path: Path, name: str, data: bytes, error=CheckpointError,
              dtypes=ARRAY_DTYPES) -> np.ndarray:
    """An array of one of `dtypes` from `.npy` bytes whose header must describe exactly the
    data that follows; anything else raises `error`."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(f)
    except (ValueError, SyntaxError, EOFError, TypeError) as exc:
        raise error(f"{path}: array {name!r} has a corrupt header ({exc})") from None
    if any(d < 0 for d in shape):
        raise error(f"{path}: array {name!r} declares a negative dimension "
                    f"{list(shape)[:8]}")
    if dtype.name not in dtypes or dtype.byteorder == ">":
        raise error(f"{path}: array {name!r} is {dtype}, expected one of "
                              f"{', '.join(dtypes)}")
    offset = f.tell()
    if math.prod(shape) * dtype.itemsize != len(data) - offset:
        raise error(f"{path}: array {name!r} declares shape {list(shape)} "
                              f"({math.prod(shape) * dtype.itemsize} bytes) but holds "
                              f"{len(data) - offset}")
    array = np.frombuffer(data, dtype, offset=offset).reshape(shape,
                                                              order="F" if fortran else "C")
    return np.array(array, order="C")
