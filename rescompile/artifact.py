"""Compiled artifacts (`.rcx`): a self-contained zip of what `rescompile compile` produced.

Members: `manifest.json` (format, versions, spec, mode, dtype, backend, step, and the sha256 of
every other member), `graph.json` (the optimised graph), `model.json` (variables and unit
activations), `variables.npz` (every variable), and `kernels/<name>.py` (the generated kernel
sources, CPU backend). Loading checks every hash and the toolchain versions, rebuilds the graph
from JSON (no passes run), regenerates the kernels and refuses the artifact unless they are the
very sources it carries.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import llvmlite
import numba
import numpy as np

from . import __version__
from .build import Model, Variable
from .fileio import atomic_write
from .compiler import Lowered
from .errors import CheckpointError, GraphError
from .ir import Graph, Value, Node, verify
from .spec import SpecError, load_spec
from .dump import to_json

FORMAT = "rescompile-artifact"
VERSION = 1


def versions() -> dict[str, str]:
    return {"rescompile": __version__, "numba": numba.__version__,
            "llvmlite": llvmlite.__version__, "numpy": np.__version__}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(exe, path) -> None:
    members = {
        "graph.json": to_json(exe.graph).encode(),
        "model.json": json.dumps(_model_doc(exe.lowered)).encode(),
        "variables.npz": _npz(exe.state),
    }
    if hasattr(exe.program, "kernel_sources"):
        for name, source in sorted(exe.program.kernel_sources().items()):
            members[f"kernels/{name}.py"] = source.encode()
    manifest = {"format": FORMAT, "version": VERSION, "versions": versions(),
                "spec": json.loads(exe.spec.to_json()), "mode": exe.mode, "dtype": exe.dtype,
                "backend": exe.backend, "step": exe.step,
                "members": {name: _sha(data) for name, data in members.items()}}
    members["manifest.json"] = json.dumps(manifest, indent=1).encode()

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                z.writestr(name, data)
    atomic_write(path, write)


def _npz(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _model_doc(lowered) -> dict:
    var_doc = lambda v: {"name": v.name, "shape": list(v.shape), "role": v.role, "init": v.init}
    return {"variables": [var_doc(v) for v in lowered.variables.values()],
            "model_variables": list(lowered.model.variables),
            "activations": lowered.model.activations}


def is_artifact(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _read_members(path: Path) -> tuple[dict, dict[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as z:
            members = {name: z.read(name) for name in z.namelist()}
        manifest = json.loads(members.pop("manifest.json"))
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt artifact ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a rescompile artifact of version {VERSION}")
    if set(members) != set(manifest["members"]):
        raise CheckpointError(f"{path}: members differ from the manifest (tampered)")
    for name, data in members.items():
        if _sha(data) != manifest["members"][name]:
            raise CheckpointError(f"{path}: member {name!r} does not match its hash (tampered)")
    return manifest, members


def _check_versions(path, manifest: dict) -> None:
    ours = versions()
    for tool, version in manifest["versions"].items():
        if ours.get(tool) != version:
            raise CheckpointError(f"{path}: built with {tool} {version}, this is {tool} "
                                  f"{ours.get(tool)}; recompile the spec")


def graph_from_json(doc: dict) -> Graph:
    graph = Graph(dtype=doc["dtype"])
    for item in doc["inputs"]:
        graph.add_input(item["name"], tuple(item["shape"]), item["role"])
    for n in doc["nodes"]:
        for out, shape in zip(n["outputs"], n["shapes"]):
            graph.values[out] = Value(out, tuple(shape), doc["dtype"])
        graph.nodes.append(Node(n["name"], n["op"], tuple(n["inputs"]), tuple(n["outputs"]),
                                n["attrs"], n["scope"], n["phase"]))
    graph.outputs.update(doc["outputs"])
    verify(graph)
    return graph


def load_artifact(path, backend: str | None = None, **options):
    from .runtime import Executable
    path = Path(path)
    manifest, members = _read_members(path)
    _check_versions(path, manifest)
    try:
        spec = load_spec(manifest["spec"])
        graph = graph_from_json(json.loads(members["graph.json"]))
    except (SpecError, GraphError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid artifact contents ({exc})") from None
    doc = json.loads(members["model.json"])
    variables = {v["name"]: Variable(v["name"], tuple(v["shape"]), v["role"], v["init"])
                 for v in doc["variables"]}
    model = Model(graph, {n: variables[n] for n in doc["model_variables"]}, doc["activations"])
    lowered = Lowered(spec, manifest["mode"], manifest["dtype"], graph, variables, model,
                      [("artifact", graph)], [], [])
    with np.load(io.BytesIO(members["variables.npz"]), allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    exe = Executable(lowered, backend=backend or manifest["backend"], variables=state,
                     step=int(manifest["step"]), **options)
    _check_kernels(path, exe, members)
    return exe


def _check_kernels(path, exe, members: dict[str, bytes]) -> None:
    """The kernels generated now must be the artifact's own, byte for byte."""
    carried = {name[len("kernels/"):-3]: data.decode() for name, data in members.items()
               if name.startswith("kernels/")}
    if not carried or not hasattr(exe.program, "kernel_sources"):
        return
    for name, source in exe.program.kernel_sources().items():
        if carried.get(name) != source:
            raise CheckpointError(f"{path}: kernel {name!r} differs from what this rescompile "
                                  "generates for the artifact's graph; recompile the spec")
