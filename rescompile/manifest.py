"""The JSON manifests of checkpoints and artifacts, checked before any field is used: each field
has a check that accepts a closed set of values (a format name, a mode, a dtype, a count, a
digest), and a manifest with a field missing, extra or of another type is refused naming the
file and the field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import CheckpointError

Check = Callable[[Any], bool]
MAX_MANIFEST_BYTES = 4 << 20
MAX_COUNT = 2**63 - 1  # a step or a count: an int64 wherever it goes
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,40}")


def parse(path, data: bytes) -> Any:
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: manifest of {len(data)} bytes, at most "
                              f"{MAX_MANIFEST_BYTES} allowed")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt manifest ({type(exc).__name__}: "
                              f"{str(exc)[:120]})") from None


def check(path, manifest: Any, fields: dict[str, tuple[Check, str]]) -> dict:
    """`manifest` must be an object with exactly `fields` (name -> (check, what it must be))."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: the manifest is not a JSON object")
    for name in manifest:
        if name not in fields:
            raise CheckpointError(f"{path}: manifest field {str(name)[:60]!r} is unknown")
    for name, (accepts, what) in fields.items():
        if name not in manifest:
            raise CheckpointError(f"{path}: manifest field {name!r} is missing")
        if not accepts(manifest[name]):
            raise CheckpointError(f"{path}: manifest field {name!r} must be {what}, got "
                                  f"{_shown(manifest[name])}")
    return manifest


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def exactly(expected) -> tuple[Check, str]:
    return (lambda v: type(v) is type(expected) and v == expected), json.dumps(expected)


def one_of(options) -> tuple[Check, str]:
    return (lambda v: type(v) is str and v in options), \
        "one of " + ", ".join(json.dumps(o) for o in options)


def count(least: int = 0) -> tuple[Check, str]:
    return (lambda v: type(v) is int and least <= v <= MAX_COUNT), \
        f"an integer >= {least} and <= {MAX_COUNT}"


def boolean() -> tuple[Check, str]:
    return (lambda v: type(v) is bool), "true or false"


def table() -> tuple[Check, str]:
    return (lambda v: isinstance(v, dict)), "an object"


def names() -> tuple[Check, str]:
    return (lambda v: isinstance(v, list) and all(type(n) is str and 0 < len(n) <= 200
                                                  for n in v)), "a list of variable names"


def versions(keys) -> tuple[Check, str]:
    accepts = lambda v: isinstance(v, dict) and sorted(v) == sorted(keys) and all(
        type(x) is str and _VERSION.fullmatch(x) for x in v.values())
    return accepts, "an object of the versions of " + ", ".join(keys)


def members(names_: tuple[str, ...]) -> tuple[Check, str]:
    """name -> {"sha256": hex digest, "size": bytes} for exactly `names_`."""
    def accepts(v) -> bool:
        return isinstance(v, dict) and sorted(v) == sorted(names_) and all(
            isinstance(m, dict) and sorted(m) == ["sha256", "size"]
            and type(m["sha256"]) is str and _SHA256.fullmatch(m["sha256"])
            and type(m["size"]) is int and 0 <= m["size"] < 2**63 for m in v.values())
    return accepts, "the sha256 and size of " + ", ".join(names_)
