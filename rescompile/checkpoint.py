"""Checkpoints: every variable (params, moving statistics, optimizer slots), the step and the
spec, in one plain `.npz` (no pickle) with a JSON manifest.

Writes are atomic (a temporary file in the same directory, fsync, then rename), so a crash
leaves the previous checkpoint intact. Reads load and check everything before anything is
used: a corrupt or truncated file, or one that disagrees with its spec, raises
CheckpointError naming the problem, never a half-loaded model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .autodiff import training_graph
from .build import build
from .errors import CheckpointError
from .fileio import atomic_write
from .spec import SpecError, load_spec

FORMAT = "rescompile-checkpoint"
VERSION = 1
MANIFEST = "__manifest__"


def save(exe, path) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "spec": json.loads(exe.spec.to_json()),
                "mode": exe.mode, "dtype": exe.dtype, "step": exe.step,
                "variables": sorted(exe.state)}
    arrays = {f"var/{name}": value for name, value in exe.state.items()}
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, variables) of a checkpoint file, fully loaded and checked for integrity."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    if MANIFEST not in arrays:
        raise CheckpointError(f"{path}: not a rescompile checkpoint (no manifest)")
    try:
        manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt manifest ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{manifest.get('format')!r} version {manifest.get('version')!r}")
    variables = {key[4:]: value for key, value in arrays.items() if key.startswith("var/")}
    if sorted(variables) != manifest["variables"]:
        raise CheckpointError(f"{path}: manifest and stored arrays disagree")
    return manifest, variables


def check_variables(path, variables: dict[str, np.ndarray], spec, dtype: str) -> None:
    """Every stored variable must be one of the spec's (model variables and training slots),
    with its shape and the dtype; every model variable must be stored."""
    expected = training_graph(build(spec, "train", dtype), spec)[1]
    for name, value in variables.items():
        if name not in expected:
            raise CheckpointError(f"{path}: variable {name!r} is not in spec {spec.name!r}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: variable {name!r} has shape {list(value.shape)}, "
                                  f"spec {spec.name!r} needs {list(expected[name].shape)}")
        if value.dtype != np.dtype(dtype):
            raise CheckpointError(f"{path}: variable {name!r} is {value.dtype}, expected {dtype}")
    missing = [n for n, v in expected.items() if v.role == "param" and n not in variables]
    if missing:
        raise CheckpointError(f"{path}: variable {missing[0]!r} is missing "
                              f"({len(missing)} missing in all)")


def load(path, spec=None, mode: str | None = None, backend: str = "reference", **options):
    """An Executable restored from a checkpoint. With `spec`, the checkpoint must match it."""
    from .runtime import compile
    manifest, variables = read(path)
    try:
        saved_spec = load_spec(manifest["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{path}: its spec is invalid: {exc}") from None
    if spec is not None and load_spec(spec).digest() != saved_spec.digest():
        raise CheckpointError(f"{path}: checkpoint is of spec {saved_spec.name!r}, which differs "
                              f"from the given spec {load_spec(spec).name!r}")
    check_variables(path, variables, saved_spec, manifest["dtype"])
    exe = compile(saved_spec, mode=mode or manifest["mode"], backend=backend,
                  dtype=manifest["dtype"], **options)
    exe.load_state({n: v for n, v in variables.items() if n in exe.lowered.variables})
    exe.step = int(manifest["step"])
    return exe
