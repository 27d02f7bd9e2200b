"""Arguments several commands share."""

import argparse

from ..build import MODES
from ..precision import DTYPES
from ..compiler import BACKENDS


def add_spec(p) -> None:
    p.add_argument("spec", help="spec file (.toml/.json) or preset name")


def add_mode(p, default: str = "infer") -> None:
    p.add_argument("--mode", choices=MODES, default=default)


def add_dtype(p, default: str | None = "float32", what: str | None = None) -> None:
    """--dtype: float32, float64, or bfloat16 (mixed precision: bfloat16 tensors, float32
    arithmetic; the user's arrays are float32). `what` names the default when it is None."""
    p.add_argument("--dtype", choices=DTYPES, default=default,
                   help=f"default: {what or default}" if what or default else None)


def add_backend(p, default: str = "cpu") -> None:
    p.add_argument("--backend", choices=BACKENDS, default=default)
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="cpu: keep the derived kernel tiles, measure none (see 'tune')")


def add_model(p, backend: str = "cpu", dtype_default: str | None = "float32") -> None:
    """What every command that compiles a spec takes: the spec, mode, dtype and backend."""
    add_spec(p)
    add_mode(p)
    add_dtype(p, dtype_default, None if dtype_default else "float32, or the checkpoint's")
    add_backend(p, default=backend)


def resolve_spec(text: str):
    """A path or TOML/JSON text, else a preset name. Anything that looks like a file name (a
    spec suffix, a directory part) is a file, so a missing file is not an unknown preset."""
    from pathlib import Path
    from ..spec import load_spec, preset
    path = Path(text)
    if "=" in text or text.lstrip().startswith("{") or path.exists() or \
            path.suffix.lower() in (".toml", ".json") or "/" in text:
        return load_spec(text)
    return preset(text)


def at_least(least: int):
    """argparse type: an integer >= `least` (argparse names the flag in its one-line error)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return integer


positive_int = at_least(1)
seed_int = at_least(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def write_or_print(text: str, path) -> None:
    if path:
        write_text(path, text)
    else:
        print(text, end="")


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path, data: bytes) -> None:
    """Write an output file atomically; a path that cannot be written is the user's to fix."""
    from ..fileio import atomic_write
    atomic_write(path, lambda f: f.write(data))
