"""Checkpoints: every variable (params, moving statistics, optimizer slots), the step and the
spec, in one plain `.npz` (no pickle) with a JSON manifest.

Writes are atomic (a temporary file in the same directory, fsync, then rename), so a crash
leaves the previous checkpoint intact, and refuse a non-finite variable, so a diverged run
never replaces a good checkpoint with NaN. Reads check everything before anything is used:
member sizes and array headers (`archive`), every manifest field (`manifest`), then each
variable's name, shape and dtype against the spec, and that none is missing. A corrupt or
truncated file, or one that disagrees with its spec, raises CheckpointError naming the file
and the field or tensor, never a half-loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import archive, manifest as fields
from .autodiff import training_graph
from .build import DTYPES, MODES, build
from .errors import CheckpointError
from .fileio import atomic_write
from .spec import SpecError, load_spec

FORMAT = "rescompile-checkpoint"
VERSION = 1
MANIFEST = "__manifest__"
MANIFEST_FIELDS = {
    "format": fields.exactly(FORMAT), "version": fields.exactly(VERSION),
    "spec": fields.table(), "mode": fields.one_of(MODES), "dtype": fields.one_of(DTYPES),
    "step": fields.count(), "variables": fields.names(),
}


def save(exe, path, data: dict | None = None) -> None:
    """`data`: what a training run keeps of its data (class names, normalisation; see
    rescompile.data.record), stored as the manifest's optional `data` table."""
    state = exe.state
    for name, value in state.items():
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: not written: variable {name!r} is not finite")
    manifest = {"format": FORMAT, "version": VERSION, "spec": json.loads(exe.spec.to_json()),
                "mode": exe.mode, "dtype": exe.dtype, "step": exe.step,
                "variables": sorted(state)}
    if data is not None:
        manifest["data"] = data
    arrays = {f"var/{name}": value for name, value in state.items()}
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, variables) of a checkpoint file, fully loaded and checked for integrity."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    arrays = archive.read_npz(path)
    if MANIFEST not in arrays or arrays[MANIFEST].dtype != np.uint8:
        raise CheckpointError(f"{path}: not a rescompile checkpoint (no manifest)")
    manifest = fields.parse(path, arrays.pop(MANIFEST).tobytes())
    if isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) != \
            (FORMAT, VERSION):
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{str(manifest.get('format'))[:60]!r} version "
                              f"{str(manifest.get('version'))[:20]!r}")
    fields.check(path, manifest, _fields_of(manifest))
    variables = {}
    for key, value in arrays.items():
        if not key.startswith("var/"):
            raise CheckpointError(f"{path}: unexpected array {key[:60]!r}")
        variables[key[4:]] = value
    if sorted(variables) != sorted(manifest["variables"]):
        raise CheckpointError(f"{path}: manifest and stored arrays disagree")
    return manifest, variables


def _fields_of(manifest) -> dict:
    """The fields a manifest must have, and `data` where it has one (checkpoints from before
    it was kept have none)."""
    if isinstance(manifest, dict) and "data" in manifest:
        return {**MANIFEST_FIELDS, "data": fields.table()}
    return MANIFEST_FIELDS


def saved_data(path) -> dict | None:
    """The manifest's `data` table, None if it has none, reading the manifest alone; the
    table's own fields are the data package's to check (`DataRecord.from_dict`)."""
    path = Path(path)
    member = archive.read_member(path, MANIFEST + ".npy", fields.MAX_MANIFEST_BYTES + 4096)
    manifest = fields.parse(path, archive.parse_npy(path, MANIFEST, member).tobytes())
    fields.check(path, manifest, _fields_of(manifest))
    return manifest.get("data")


def saved_spec(path, manifest: dict):
    try:
        return load_spec(manifest["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{path}: its spec is invalid: {exc}") from None


def check_stored(path, name: str, value: np.ndarray, expected: dict, dtype: str,
                 owner: str) -> None:
    """One stored variable against `expected` (name -> Variable), which `owner` declares:
    one of them, of its shape and of `dtype`, and finite."""
    if name not in expected:
        raise CheckpointError(f"{path}: variable {name[:80]!r} is not in {owner}")
    if tuple(value.shape) != tuple(expected[name].shape):
        raise CheckpointError(f"{path}: variable {name!r} has shape {list(value.shape)}, "
                              f"{owner} needs {list(expected[name].shape)}")
    if value.dtype != np.dtype(dtype):
        raise CheckpointError(f"{path}: variable {name!r} is {value.dtype}, expected {dtype}")
    if not np.isfinite(value).all():
        raise CheckpointError(f"{path}: variable {name!r} is not finite")


def check_variables(path, variables: dict[str, np.ndarray], spec, dtype: str, mode: str,
                    fresh_optimizer: bool = False) -> None:
    """Every stored variable must be one of the spec's (model variables and training slots),
    with its shape and the dtype. Every model variable must be stored, and for training every
    optimizer slot too, unless `fresh_optimizer` (the slots then start from zero)."""
    model = build(spec, "train", dtype)
    expected = training_graph(model, spec)[1]
    for name, value in variables.items():
        check_stored(path, name, value, expected, dtype, f"spec {spec.name!r}")
    required = [n for n in expected if n in model.variables or
                (mode == "train" and not fresh_optimizer)]
    missing = [n for n in required if n not in variables]
    if missing:
        what = "model variable" if missing[0] in model.variables else "optimizer slot"
        hint = "" if what == "model variable" else \
            " (fresh_optimizer=True, or --fresh-optimizer, starts the optimizer from zero)"
        raise CheckpointError(f"{path}: {what} {missing[0]!r} is missing "
                              f"({len(missing)} missing in all){hint}")
