"""The CPU backend beyond numerics: artifacts, generated-code safety, finite checks, the cache
and bench commands. Executables are compiled once per module and shared."""

import json
import zipfile

import numpy as np
import pytest

import rescompile as rc
from rescompile.artifact import save_artifact
from rescompile.backends.cpu.lower import lower_node
from rescompile.backends.cpu.target import host_target
from rescompile.build import build
from rescompile.cli import main
from conftest import random_bn_state, rel_err, tiny_spec


@pytest.fixture(scope="module")
def infer_exe():
    exe = rc.compile(tiny_spec(), mode="infer", backend="cpu", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    return exe


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)


def test_cpu_matches_reference(infer_exe, images):
    reference = rc.compile(tiny_spec(), mode="infer", seed=1)
    reference.load_params(infer_exe.params)
    assert rel_err(infer_exe.forward(images), reference.forward(images)) < 1e-5


def test_artifact_round_trip_runs_without_passes(infer_exe, images, tmp_path, monkeypatch):
    path = tmp_path / "model.rcx"
    save_artifact(infer_exe, path)
    import rescompile.compiler as compiler
    monkeypatch.setattr(compiler, "run_pipeline", None)  # loading must not lower again
    loaded = rc.load(path)
    assert loaded.backend == "cpu" and loaded.mode == "infer"
    np.testing.assert_array_equal(loaded.forward(images), infer_exe.forward(images))


def _rewrite_member(src, dst, member, change):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = change(members[member])
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_tampered_or_mismatched_artifacts_are_refused(infer_exe, tmp_path):
    path = tmp_path / "model.rcx"
    save_artifact(infer_exe, path)
    kernel = next(n for n in zipfile.ZipFile(path).namelist() if n.startswith("kernels/"))
    _rewrite_member(path, tmp_path / "k.rcx", kernel, lambda b: b + b"\nimport os\n")
    with pytest.raises(rc.CheckpointError, match="does not match its hash"):
        rc.load(tmp_path / "k.rcx")
    _rewrite_member(path, tmp_path / "v.rcx", "manifest.json", lambda b: json.dumps(
        dict(json.loads(b), versions={**json.loads(b)["versions"], "numba": "0.1"})).encode())
    with pytest.raises(rc.CheckpointError, match="built with numba 0.1"):
        rc.load(tmp_path / "v.rcx")
    (tmp_path / "cut.rcx").write_bytes(path.read_bytes()[:500])
    with pytest.raises(rc.CheckpointError):
        rc.load(tmp_path / "cut.rcx")


def test_hostile_spec_names_and_values_are_rejected():
    for name in ['x"); import os; os.system("true") #', "../../etc", "a\nb"]:
        with pytest.raises(rc.SpecError, match="name"):
            tiny_spec().replace(name=name)
    for bad in [float("nan"), float("inf"), "0.1); import os #", True]:
        with pytest.raises(rc.SpecError, match="relu_leakiness"):
            tiny_spec(relu_leakiness=bad)


def test_generated_code_holds_no_user_text():
    """A kernel's IR is made from its signature alone (dtype, target, epilogue step names):
    node names never reach it, and attribute values are run-time numbers, refused unless they
    are numbers."""
    graph = build(tiny_spec(), "infer", "float32").graph
    node = next(n for n in graph.nodes if n.op == "relu")
    hostile = node.replace(name='evil"); __import__("os").system("true") #')
    (step,) = lower_node(hostile, graph, host_target(), "float32")
    assert "evil" not in step.kernel.ir() and "__import__" not in step.kernel.ir()
    assert step.fields["s0.alpha"] == node.attrs["alpha"]
    with pytest.raises(ValueError):
        lower_node(node.replace(attrs={"alpha": "0.1); import os #"}), graph, host_target(),
                   "float32")


def test_check_finite_names_the_first_bad_kernel(images):
    exe = rc.compile(tiny_spec(), mode="infer", backend="cpu", seed=1, check_finite=True)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    exe.forward(images)
    with pytest.raises(FloatingPointError, match="node 'init/init_conv'"):
        exe.forward(bad)


def test_cache_info_and_clear(tmp_path, capsys):
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "abc.o").write_bytes(b"object")
    (tmp_path / "keep.txt").write_text("not ours\n")
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    assert "1 CPU micro-kernels" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.txt"]


def test_dump_kernels_prints_generated_source(capsys):
    assert main(["dump", "examples/seed_small.toml", "--kernels", "--node", "unit_1_1/sub1"]) == 0
    out = capsys.readouterr().out
    assert "# node unit_1_1/sub1/conv1: conv_float32_" in out and "define void @" in out
    assert main(["dump", "examples/seed_small.toml", "--kernels", "--asm", "--node",
                 "unit_1_1/sub1"]) == 0
    assert "ret" in capsys.readouterr().out


def test_bench_reports_a_table(capsys):
    spec = tiny_spec().to_toml()
    assert main(["bench", spec, "--batch", "2", "--repeat", "2", "--no-peers",
                 "--no-warm", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "% of FMA peak" in out and "kernel (node)" in out
    assert "init/init_conv" in out
