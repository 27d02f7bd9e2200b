"""The CPU backend beyond numerics: generated-code safety, finite checks, the cache and bench
commands. Executables are compiled once per module and shared."""

import datetime
import json
import os

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu.lower import lower_node
from rescompile.backends.cpu.target import host_target
from rescompile.bench import bench, cpu_model
from rescompile.build import build
from rescompile.cli import main
from rescompile.kernel_cache import RECORD, write_cache_file
from conftest import rel_err, tiny_spec


def test_cpu_matches_reference(infer_exe, images):
    reference = rc.compile(tiny_spec(), mode="infer", seed=1)
    reference.load_params(infer_exe.params)
    assert rel_err(infer_exe.forward(images), reference.forward(images)) < 1e-5


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
    (other,) = lower_node(node.replace(attrs={"alpha": 0.3}), graph, host_target(), "float32")
    assert other.kernel.ir() == step.kernel.ir()  # alpha is an argument, not in the code
    with pytest.raises(ValueError):
        lower_node(node.replace(attrs={"alpha": "0.1); import os #"}), graph, host_target(),
                   "float32")


def test_check_finite_names_the_first_bad_kernel(images):
    """Inputs are finite (the API refuses others); weights near float32's limit overflow in
    the first convolution, which the check names."""
    exe = rc.compile(tiny_spec(), mode="infer", backend="cpu", seed=1, check_finite=True)
    exe.forward(images)
    params = dict(exe.params)
    params["init/init_conv/DW"] = np.full(params["init/init_conv/DW"].shape, 3e38)
    exe.load_params(params)
    with pytest.raises(FloatingPointError, match="node 'init/init_conv'"):
        exe.forward(images)


def test_check_finite_reads_each_output_where_its_kernel_wrote_it(monkeypatch):
    """Checking runs every image shared, so an output kept whole for a later segment (the
    stem's pool here) is written to the shared region, not its batch buffer: the check reads
    it there, the max pool of the conv output it checked before."""
    from rescompile import ops
    from rescompile.backends.cpu.program import CpuProgram
    seen = {}
    monkeypatch.setattr(CpuProgram, "_check", staticmethod(
        lambda step, arrays: seen.update((v, np.array(a, np.float64)) for v, a in arrays.items())))
    exe = rc.compile(tiny_spec(stem="imagenet"), mode="infer", backend="cpu", seed=1,
                     check_finite=True)
    exe.forward(np.random.default_rng(0).standard_normal((3, 8, 8, 3)))
    pool = next(n for n in exe.program.graph.nodes if n.name == "init/pool")
    assert pool.outputs[0] in exe.program.arena(exe.program.schedule, 3).batch_buffers
    (expected,) = ops.get(pool.op).run_reference(pool.attrs, seen[pool.inputs[0]])
    np.testing.assert_array_equal(seen[pool.outputs[0]], expected)


def test_cache_clear_removes_only_what_rescompile_wrote(tmp_path, capsys):
    write_cache_file(tmp_path, "objects/abc.o", b"object")
    write_cache_file(tmp_path, "cuda/k_1.py", b"kernel = None\n")
    (tmp_path / "cuda" / "__pycache__").mkdir()
    (tmp_path / "cuda" / "__pycache__" / "k_1.kernel-1.py311.nbi").write_bytes(b"numba")
    (tmp_path / "objects" / "users.o").write_bytes(b"not ours")
    (tmp_path / "keep.txt").write_text("not ours\n")
    with open(tmp_path / RECORD, "a") as record:
        record.write("../outside.txt\n/etc/passwd\n")   # the record is trusted no further
    (tmp_path.parent / "outside.txt").write_text("not ours\n")
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    assert "1 CPU micro-kernels, 1 CUDA modules" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "(3 files)" in capsys.readouterr().out
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["keep.txt", "objects/users.o"]
    assert (tmp_path.parent / "outside.txt").exists()


def test_dump_kernels_prints_generated_source(capsys):
    assert main(["dump", "examples/seed_small.toml", "--kernels", "--node", "unit_1_1/sub1"]) == 0
    out = capsys.readouterr().out
    assert "# node unit_1_1/sub1/conv1: conv_float32_" in out and "define void @" in out
    assert main(["dump", "examples/seed_small.toml", "--kernels", "--asm", "--node",
                 "unit_1_1/sub1"]) == 0
    assembly = capsys.readouterr().out
    register = {"avx512": "%zmm", "avx2": "%ymm", "portable": "%xmm"}[host_target().isa]
    assert register in assembly and "define void" not in assembly  # the host's code, not IR
    assert ("vfmadd" in assembly) == host_target().fma


def test_bench_times_each_contender_in_its_own_process_at_batch_1(tmp_path, capsys):
    """At batch 1 each contender runs alone in a fresh process (no other framework imported
    there), then all of them interleaved in this one; the report names the machine and the
    ISA, and its profile the bytes each step moves."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "bench.json"
    assert main(["bench", tiny_spec().to_toml(), "--batch", "1", "--repeat", "1", "--rounds",
                 "1", "--peer", "onnxruntime", "--no-warm", "--profile", "--json",
                 str(out)]) == 0
    text, target = capsys.readouterr().out, host_target()
    assert f"{cpu_model()}; LLVM CPU {target.cpu}, kernels for {target.name};" in text
    assert "images/s" in text and "% of FMA peak; own process" in text
    assert "init/init_conv" in text and "FLOP/B" in text
    doc = json.loads(out.read_text())
    assert (doc["host"]["isa"], doc["host"]["llvm_cpu"]) == (target.name, target.cpu)
    measured = datetime.datetime.fromisoformat(doc["host"]["date"])
    assert abs(datetime.datetime.now().astimezone() - measured).total_seconds() < 600
    rows = {(r["method"], r["contender"]): r for r in doc["rows"]}
    assert list(rows) == [(method, who) for method in ("own process", "interleaved")
                          for who in ("rescompile", "onnxruntime")]
    alone = [rows["own process", who] for who in ("rescompile", "onnxruntime")]
    assert len({row["pid"] for row in alone} | {os.getpid()}) == 3
    assert [row["frameworks"] for row in alone] == [[], ["onnxruntime"]]
    assert {rows["interleaved", who]["pid"] for who in ("rescompile", "onnxruntime")} == \
        {os.getpid()}
    conv = next(row for row in doc["profile"] if row["name"] == "init/init_conv")
    assert conv["bytes_read"] > 0 and conv["flop_per_byte"] > 0


def test_bench_of_a_bfloat16_model_names_its_peers_precision_and_peak():
    """bench in bfloat16 at batch 1: rescompile and ONNX Runtime (float32, named so) in
    processes of their own and interleaved, the peak of the instruction the kernels multiply
    with, and a profile whose bytes are of the stored types (half of float32's for a conv's
    bfloat16 input and output)."""
    from rescompile.backends.cpu.llvm.measure import peak_instruction
    from rescompile.bench import PEAK_INSTRUCTIONS, format_report, report_json
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    reports = {dtype: bench(tiny_spec(), batch=1, dtype=dtype, repeat=1, rounds=1,
                            peers=["onnxruntime"], warm=False, profile=True)
               for dtype in ("float32", "bfloat16")}
    report = reports["bfloat16"]
    doc = json.loads(report_json(report))
    assert [(r["method"], r["contender"]) for r in doc["rows"]] == [
        (method, who) for method in ("own process", "interleaved")
        for who in ("rescompile", "onnxruntime fp32")]
    assert doc["host"]["isa"] == host_target().name
    instruction = PEAK_INSTRUCTIONS[peak_instruction(host_target(), "bfloat16")]
    assert report.peak_instruction == peak_instruction(host_target(), "bfloat16")
    text = format_report(report)
    assert f"% of {instruction} peak; own process" in text and "onnxruntime fp32" in text
    conv = {dtype: next(row for row in r.profile if row["name"] == "unit_1_0/sub1/conv1")
            for dtype, r in reports.items()}
    assert 2 * conv["bfloat16"]["bytes_written"] == conv["float32"]["bytes_written"]


def test_bench_interleaves_at_larger_batches_unless_asked():
    for own_process, methods in ((None, ["interleaved"]), (True, ["own process",
                                                                  "interleaved"])):
        report = bench(tiny_spec(), batch=2, backend="reference", repeat=1, rounds=1,
                       peers=False, warm=False, own_process=own_process)
        assert [m.name for m in report.methods] == methods
