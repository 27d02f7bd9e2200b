"""Reading the zip archives rescompile writes (`.npz` checkpoints, `.rcx` artifacts) when they
may come from anyone: member names and declared sizes are checked against bounds (and the
caller's expectations) before anything is decompressed, each array's header is checked
against its member's size before the array is made, and nothing is unpickled.

A zip member's declared size bounds what reading it can produce: Python's zipfile stops there
and then fails the CRC, so a "zip bomb" costs at most what its directory admits to.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .resources import GIB, available_bytes

MAX_TOTAL_BYTES = 64 * 2**30  # far above ResNet-152's weights and optimizer slots in float64
ARRAY_DTYPES = ("float32", "float64", "uint8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def has_member(path, name: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return name in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def read_members(path: Path, expected: dict[str, int] | None = None,
                 data: bytes | None = None, error=CheckpointError) -> dict[str, bytes]:
    """Every member of the zip at `path` (or in `data`, read from `path`). With `expected`
    (name -> size in bytes), the members must be exactly those, each of that size. Problems
    raise `error` (a data file's are the user's input, not a checkpoint's)."""
    try:
        with zipfile.ZipFile(path if data is None else io.BytesIO(data)) as z:
            infos = z.infolist()
            _check_directory(path, infos, expected)
            return {info.filename: z.read(info) for info in infos}
    except CheckpointError as exc:
        raise exc if error is CheckpointError else error(str(exc)) from None
    except zipfile.BadZipFile as exc:
        raise error(f"{path}: corrupt archive ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, NotImplementedError, EOFError) as exc:  # a malformed directory
        raise error(f"{path}: corrupt archive ({exc})") from None


def read_member(path: Path, name: str, limit: int) -> bytes:
    """One member, refused if missing or declared larger than `limit` bytes."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(name)
            if info.file_size > limit:
                raise CheckpointError(f"{path}: member {name!r} declares {info.file_size} "
                                      f"bytes, at most {limit} allowed")
            return z.read(info)
    except KeyError:
        raise CheckpointError(f"{path}: no member {name!r}") from None
    except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt archive ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _check_directory(path: Path, infos, expected: dict[str, int] | None) -> None:
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: a member name appears twice")
    if expected is not None:
        extra = sorted(set(names) - set(expected))
        missing = sorted(set(expected) - set(names))
        if extra or missing:
            what = f"unexpected member {extra[0]!r}" if extra else f"no member {missing[0]!r}"
            raise CheckpointError(f"{path}: {what} (members differ from the manifest)")
        for info in infos:
            if info.file_size != expected[info.filename]:
                raise CheckpointError(f"{path}: member {info.filename!r} declares "
                                      f"{info.file_size} bytes, the manifest "
                                      f"{expected[info.filename]}")
    total = sum(info.file_size for info in infos)
    bound = min(MAX_TOTAL_BYTES, available_bytes())
    if total > bound:
        raise CheckpointError(f"{path}: its members declare {total / GIB:.1f} GiB, more than "
                              f"the {bound / GIB:.1f} GiB this machine can read")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(path: Path, data: bytes | None = None, error=CheckpointError,
             dtypes=ARRAY_DTYPES) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` (the file, or its bytes if given), by key, each of `dtypes`."""
    arrays = {}
    for name, member in read_members(path, data=data, error=error).items():
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
