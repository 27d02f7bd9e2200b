"""Compiled artifacts: they round-trip on every backend, and a tampered one is refused or inert,
never executed: a payload in any manifest or graph field, with the hashes recomputed as an
attacker would, runs nothing."""

import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pytest

import rescompile as rc
from rescompile.archive import npz_bytes
from rescompile.artifact import save_artifact
from conftest import peak_bytes, rel_err, tiny_spec

SENTINEL_NAME = "rescompile-artifact-payload-ran"


@pytest.fixture(scope="module")
def artifact(infer_exe, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "model.rcx"
    save_artifact(infer_exe, path)
    return path


def test_round_trip_on_every_backend(infer_exe, images, artifact):
    loaded = rc.load(artifact)
    assert loaded.backend == "cpu" and loaded.mode == "infer" and loaded.step == 0
    np.testing.assert_array_equal(loaded.forward(images), infer_exe.forward(images))
    reference = rc.load(artifact, backend="reference")
    assert rel_err(reference.forward(images), infer_exe.forward(images)) < 1e-5
    assert not any(n.startswith("kernels/") for n in zipfile.ZipFile(artifact).namelist())


def test_train_artifact_keeps_optimizer_state(tmp_path, images):
    exe = rc.compile(tiny_spec(), mode="train", seed=3)
    exe.train_step(images, [0, 1])
    save_artifact(exe, tmp_path / "t.rcx")
    loaded = rc.load(tmp_path / "t.rcx")
    assert loaded.step == 1
    for name, value in exe.state.items():
        np.testing.assert_array_equal(loaded.state[name], value)
    assert loaded.train_step(images, [0, 1]) == exe.train_step(images, [0, 1])


def members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write(path, contents: dict, rehash: bool = True) -> None:
    """An artifact from `contents`, its manifest's hashes and sizes recomputed (as an attacker
    can) unless `rehash` is False."""
    contents = dict(contents)
    manifest = json.loads(contents["manifest.json"])
    if rehash and isinstance(manifest.get("members"), dict):
        for name in manifest["members"]:
            if name in contents:
                manifest["members"][name] = {
                    "sha256": hashlib.sha256(contents[name]).hexdigest(),
                    "size": len(contents[name])}
        contents["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in contents.items():
            z.writestr(name, data)


def edited(path, member: str, change) -> dict:
    contents = members(path)
    contents[member] = json.dumps(change(json.loads(contents[member]))).encode()
    return contents


def leaves(doc, where=()):
    """Every (path, value) of a JSON document's scalars and containers."""
    yield where, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from leaves(value, where + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from leaves(value, where + (i,))


def replaced(doc, where, value):
    if not where:
        return value
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return doc


def payloads(sentinel) -> list:
    code = f"__import__('pathlib').Path({str(sentinel)!r}).touch()"
    return [code, f'"); {code} #', {"__reduce__": code}]


def test_a_payload_in_any_field_runs_nothing(artifact, tmp_path, images):
    sentinel = tmp_path / SENTINEL_NAME
    outcomes = {"refused": 0, "inert": 0}
    graph_doc = json.loads(members(artifact)["graph.json"])
    # Every manifest field, and a sample of the graph's (every node field of a few nodes).
    targets = [("manifest.json", w) for w, _ in leaves(json.loads(members(artifact)
                                                                  ["manifest.json"])) if w]
    nodes = graph_doc["nodes"]
    for i in (0, len(nodes) // 2, len(nodes) - 1):
        targets += [("graph.json", w) for w, _ in leaves(nodes[i], ("nodes", i))]
    targets += [("graph.json", (key,)) for key in graph_doc]
    for k, (member, where) in enumerate(targets):
        for j, payload in enumerate(payloads(sentinel)):
            path = tmp_path / f"p{k}-{j}.rcx"
            write(path, edited(artifact, member, lambda d: replaced(d, where, payload)))
            try:
                rc.load(path).forward(images)
                outcomes["inert"] += 1
            except (rc.CheckpointError, rc.SpecError) as exc:
                assert "\n" not in str(exc)
                outcomes["refused"] += 1
            assert not sentinel.exists(), (member, where, payload)
    assert outcomes["refused"] > 0 and len(targets) > 50


def test_tampered_weights_load_inert_hashes_only_catch_accidents(artifact, tmp_path, images):
    contents = members(artifact)
    z = np.load(io.BytesIO(contents["variables.npz"]))
    arrays = {k: z[k] for k in z.files}
    arrays["logit/biases"] = arrays["logit/biases"] + 1
    contents["variables.npz"] = npz_bytes(arrays)
    write(tmp_path / "w.rcx", contents)                      # hashes recomputed: loads
    changed = rc.load(tmp_path / "w.rcx").forward(images)
    assert not np.allclose(changed, rc.load(artifact).forward(images))
    write(tmp_path / "c.rcx", contents, rehash=False)        # an accident: refused
    with pytest.raises(rc.CheckpointError, match="'variables.npz' does not match its hash"):
        rc.load(tmp_path / "c.rcx")


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "versions": {}}, "field 'versions' must be an object of the versions"),
    (lambda m: {**m, "versions": {**m["versions"], "numba": "0.1"}}, "built with numba 0.1"),
    (lambda m: {**m, "dtype": "float16"}, "field 'dtype' must be one of"),
    (lambda m: {**m, "mode": "eval"}, "field 'mode' must be one of"),
    (lambda m: {**m, "backend": "tpu"}, "field 'backend' must be one of"),
    (lambda m: {**m, "step": -1}, "field 'step' must be an integer >= 0"),
    (lambda m: {**m, "step": "1"}, "field 'step' must be an integer >= 0"),
    (lambda m: {k: v for k, v in m.items() if k != "spec"}, "field 'spec' is missing"),
    (lambda m: {**m, "extra": 1}, "field 'extra' is unknown"),
    (lambda m: {**m, "version": 1}, "not a rescompile artifact of version 2"),
    (lambda m: [m], "not a JSON object"),
    (lambda m: {**m, "spec": {**m["spec"], "name": "a b"}}, "its spec is invalid: name"),
    (lambda m: {**m, "mode": "train"}, "its graph is not the one"),
])
def test_bad_manifests_are_refused_by_field(artifact, tmp_path, change, message):
    write(tmp_path / "m.rcx", edited(artifact, "manifest.json", change), rehash=False)
    with pytest.raises(rc.CheckpointError, match=message):
        rc.load(tmp_path / "m.rcx")


@pytest.mark.parametrize("rehash, words", [
    (False, r"'variables.npz' declares 134217728 bytes, \d+ expected"),   # the manifest's size
    (True, r"'variables.npz' declares 134217728 bytes, the spec's variables need at most"),
])
def test_members_are_checked_before_they_are_decompressed(artifact, tmp_path, rehash, words):
    """128 MB that deflates to 128 kB, whether or not the manifest admits to it: refused
    before decompression, with the memory held staying far below the member's size."""
    contents = members(artifact)
    contents["variables.npz"] = b"\0" * (128 << 20)
    write(tmp_path / "bomb.rcx", contents, rehash=rehash)
    assert (tmp_path / "bomb.rcx").stat().st_size < 1 << 20
    peak, message = peak_bytes(lambda: rc.load(tmp_path / "bomb.rcx"), rc.CheckpointError)
    assert re.search(words, message) and peak < 100 << 20, (message, peak)


def test_unexpected_and_cut_members_are_refused(artifact, tmp_path):
    extra = {**members(artifact), "kernels/x.py": b"import os\n"}
    write(tmp_path / "extra.rcx", extra, rehash=False)
    with pytest.raises(rc.CheckpointError, match="unexpected member 'kernels/x.py'"):
        rc.load(tmp_path / "extra.rcx")
    (tmp_path / "cut.rcx").write_bytes(artifact.read_bytes()[:500])
    with pytest.raises(rc.CheckpointError, match="cut.rcx"):
        rc.load(tmp_path / "cut.rcx")
