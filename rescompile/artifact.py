"""Compiled artifacts (`.rcx`): what `rescompile compile` produced, as data only.

Members: `manifest.json` (format, versions, spec, mode, dtype, backend, step, and the sha256
and size of every other member), `graph.json` (the optimised graph, for reading and as a
check) and `variables.npz` (every variable). An artifact holds no code, and loading one
executes none of it: the manifest's fields are checked against closed sets, the spec is
validated like any spec, the graph is lowered again from that spec by this rescompile and must
equal the artifact's byte for byte, and the variables must be exactly the graph's, by name,
shape and dtype, and finite. The kernels are then this process's own, generated from its own
graph (and found in the kernel cache when it has them). So an artifact from a stranger is as
safe to load as an ONNX or safetensors file. The hashes only catch accidental corruption: an
attacker can recompute them, and needs no more than a changed weight to change the numbers.
"""

from __future__ import annotations

import json
import zipfile

import llvmlite
import numba
import numpy as np

from . import archive, checkpoint, manifest as fields
from .version import __version__
from .build import MODES
from .precision import DTYPES, compute_dtype
from .compiler import BACKENDS, lower
from .dump import to_json
from .errors import CheckpointError
from .fileio import atomic_write
from .spec import SpecError, load_spec

FORMAT = "rescompile-artifact"
VERSION = 2
MEMBERS = ("graph.json", "variables.npz")


def versions() -> dict[str, str]:
    return {"rescompile": __version__, "numba": numba.__version__,
            "llvmlite": llvmlite.__version__, "numpy": np.__version__}


MANIFEST_FIELDS = {
    "format": fields.exactly(FORMAT), "version": fields.exactly(VERSION),
    "versions": fields.versions(tuple(versions())), "spec": fields.table(),
    "mode": fields.one_of(MODES), "dtype": fields.one_of(DTYPES),
    "backend": fields.one_of(BACKENDS), "step": fields.count(),
    "members": fields.members(MEMBERS),
}


def save_artifact(exe, path) -> None:
    members = {"graph.json": to_json(exe.graph).encode(),
               "variables.npz": archive.npz_bytes(exe.state)}
    manifest = {"format": FORMAT, "version": VERSION, "versions": versions(),
                "spec": json.loads(exe.spec.to_json()), "mode": exe.mode, "dtype": exe.dtype,
                "backend": exe.backend, "step": exe.step,
                "members": {name: {"sha256": archive.sha256(data), "size": len(data)}
                            for name, data in members.items()}}

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, data in members.items():
                z.writestr(name, data)
    atomic_write(path, write)


def is_artifact(path) -> bool:
    return archive.has_member(path, "manifest.json")


def load_artifact(path, backend: str | None = None, dtype: str | None = None, **options):
    """The artifact's executable (compiled in `dtype`, by default the manifest's). Its
    manifest is read first; the spec it names is lowered again, and every member's declared
    size checked against what that graph and its variables need, before anything else is
    decompressed."""
    from .runtime import Executable
    manifest_bytes = archive.read_member(path, "manifest.json", fields.MAX_MANIFEST_BYTES,
                                         "artifact")
    manifest = _manifest(path, fields.parse(path, manifest_bytes))
    try:
        spec = load_spec(manifest["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{path}: its spec is invalid: {exc}") from None
    lowered = lower(spec, manifest["mode"], manifest["dtype"])
    graph = to_json(lowered.graph).encode()
    variable_sizes = {f"{name}.npy": archive.npy_bounds(v.shape, compute_dtype(lowered.dtype))
                      for name, v in lowered.variables.items()}
    _check_sizes(path, manifest, len(graph), archive.npz_bound(variable_sizes))
    sizes = {name: (m["size"], m["size"]) for name, m in manifest["members"].items()}
    members = archive.read_members(path, {**sizes, "manifest.json": (len(manifest_bytes),) * 2},
                                   what="artifact")
    for name in MEMBERS:
        if archive.sha256(members[name]) != manifest["members"][name]["sha256"]:
            raise CheckpointError(f"{path}: member {name!r} does not match its hash (corrupt)")
    if members["graph.json"] != graph:
        raise CheckpointError(f"{path}: its graph is not the one this rescompile compiles its "
                              f"spec to; recompile the spec")
    arrays = archive.read_npz(path, variable_sizes, members["variables.npz"], "artifact")
    variables = _variables(path, arrays, lowered)
    if dtype is not None and dtype != lowered.dtype:
        lowered = lower(spec, manifest["mode"], dtype)
    return Executable(lowered, backend=backend or manifest["backend"],
                      variables=variables, step=manifest["step"],
                      **options)


def _check_sizes(path, manifest: dict, graph_bytes: int, variables_most: int) -> None:
    """The manifest's member sizes against what the lowered spec needs: its graph exactly,
    its variables at most `variables_most` bytes."""
    if manifest["members"]["graph.json"]["size"] != graph_bytes:
        raise CheckpointError(f"{path}: its graph is not the one this rescompile compiles its "
                              f"spec to; recompile the spec")
    size = manifest["members"]["variables.npz"]["size"]
    if size > variables_most:
        raise CheckpointError(f"{path}: member 'variables.npz' declares {size} bytes, the "
                              f"spec's variables need at most {variables_most}")


def _manifest(path, manifest) -> dict:
    if isinstance(manifest, dict) and (manifest.get("format"), manifest.get("version")) != \
            (FORMAT, VERSION):
        raise CheckpointError(f"{path}: not a rescompile artifact of version {VERSION}")
    fields.check(path, manifest, MANIFEST_FIELDS)
    ours = versions()
    for tool, version in manifest["versions"].items():
        if ours[tool] != version:
            raise CheckpointError(f"{path}: built with {tool} {version}, this is {tool} "
                                  f"{ours[tool]}; recompile the spec")
    return manifest


def _variables(path, arrays: dict, lowered) -> dict:
    """The stored variables (exactly the graph's, as `read_npz` checked) each as
    `checkpoint.check_stored` checks a checkpoint's."""
    for name, value in arrays.items():
        checkpoint.check_stored(path, name, value, lowered.variables, lowered.dtype,
                                "the graph")
    return arrays
