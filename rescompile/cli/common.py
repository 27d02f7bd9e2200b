"""Arguments several commands share."""

from ..build import DTYPES, MODES
from ..compiler import BACKENDS


def add_spec(p) -> None:
    p.add_argument("spec", help="spec file (.toml/.json) or preset name")


def add_mode(p, default: str = "infer") -> None:
    p.add_argument("--mode", choices=MODES, default=default)


def add_dtype(p, default: str = "float32") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=default)


def add_backend(p, default: str = "cpu") -> None:
    p.add_argument("--backend", choices=BACKENDS, default=default)


def resolve_spec(text: str):
    """A path or TOML/JSON text, else a preset name."""
    from pathlib import Path
    from ..spec import load_spec, preset
    if "=" in text or text.lstrip().startswith("{") or Path(text).exists():
        return load_spec(text)
    return preset(text)


def write_or_print(text: str, path) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text, end="")
