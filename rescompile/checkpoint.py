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
from .build import MODES, build
from .precision import DTYPES, compute_dtype
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
    """(manifest, variables) of a checkpoint file, fully loaded and checked for integrity.
    The manifest is read first, and every other member's declared size checked against what
    its variable of the saved spec holds, before any of them is decompressed."""
    path = Path(path)
    manifest = _manifest(path)
    expected = spec_variables(saved_spec(path, manifest), manifest["dtype"])
    sizes = {f"{MANIFEST}.npy": (0, fields.MAX_MANIFEST_BYTES + archive.MAX_NPY_HEADER)}
    for name in manifest["variables"]:
        if name not in expected:
            raise CheckpointError(f"{path}: variable {name[:80]!r} is not in spec "
                                  f"{manifest['spec'].get('name', '?')!r}")
        sizes[f"var/{name}.npy"] = archive.npy_bounds(expected[name].shape,
                                                      compute_dtype(manifest["dtype"]))
    arrays = archive.read_npz(path, sizes)
    arrays.pop(MANIFEST)
    return manifest, {key[4:]: value for key, value in arrays.items()}


def _manifest(path: Path) -> dict:
    data = archive.read_member(path, f"{MANIFEST}.npy",
                               fields.MAX_MANIFEST_BYTES + archive.MAX_NPY_HEADER)
    array = archive.parse_npy(path, MANIFEST, data)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise CheckpointError(f"{path}: not a rescompile checkpoint (its manifest is not text)")
    manifest = fields.parse(path, array.tobytes())
    if isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) != \
            (FORMAT, VERSION):
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{str(manifest.get('format'))[:60]!r} version "
                              f"{str(manifest.get('version'))[:20]!r}")
    return fields.check(path, manifest, _fields_of(manifest))


def spec_variables(spec, dtype: str) -> dict:
    """name -> Variable of everything a checkpoint of `spec` may store: the model's variables
    and the training slots."""
    return training_graph(build(spec, "train", dtype), spec)[1]


def _fields_of(manifest) -> dict:
    """The fields a manifest must have, and `data` where it has one (checkpoints from before
    it was kept have none)."""
    if isinstance(manifest, dict) and "data" in manifest:
        return {**MANIFEST_FIELDS, "data": fields.table()}
    return MANIFEST_FIELDS


def saved_data(path) -> dict | None:
    """The manifest's `data` table, None if it has none, reading the manifest alone; the
    table's own fields are the data package's to check (`DataRecord.from_dict`)."""
    return _manifest(Path(path)).get("data")


def saved_spec(path, manifest: dict):
    try:
        return load_spec(manifest["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{path}: its spec is invalid: {exc}") from None


def check_stored(path, name: str, value: np.ndarray, expected: dict, dtype: str,
                 owner: str) -> None:
    """One stored variable against `expected` (name -> Variable), which `owner` declares:
    one of them, of its shape and of `dtype`'s variables (float32 for bfloat16: master
    weights), and finite."""
    dtype = compute_dtype(dtype)
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
    expected = spec_variables(spec, dtype)
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
