"""Data-parallel training on MPI, two ranks on this machine (`mpiexec -n 2`, float64):

- with batch_norm.sync, the ranks' loss, gradients, batch statistics and variables after one
  and after four steps equal one process's on the whole batch within 1e-12 relative (float64
  sums in another order: about 1e-14 measured);
- with per-rank statistics, they equal the mean of the two shares' gradients and statistics
  computed separately (bitwise: the same kernels on the same shares, then the same mean);
- the ranks' variables stay bitwise equal (digests compared);
- a resumed two-rank run is bit-identical to an uninterrupted one (CLI, cpu backend);
- a rank that raises, or is killed, ends the whole job within seconds; a rank that never
  comes to an exchange ends it at the exchange deadline, named (also when the exchange runs
  inside the cpu backend's driver);
- ranks started with different flags or specs stop the job at once, naming the difference.
Without mpi4py (the `mpi` extra, also in `test`) these are skipped.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import rescompile as rc
from rescompile import checkpoint

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
SCRIPT = Path(__file__).parent / "distributed" / "ranks.py"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # two cold compiles of the cpu backend with room on a loaded machine
TOLERANCE = 1e-12


def mpiexec(*args, ranks=2, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([MPIEXEC, "-n", str(ranks), *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_ranks_match_one_process(tmp_path, backend):
    out = tmp_path / "results.json"
    done = mpiexec(sys.executable, SCRIPT, "parity", backend, out)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    for mode in ("sync", "per_rank"):
        checks = results[mode]
        assert checks.pop("digests_equal"), f"{mode}: ranks' variables differ"
        for name, err in checks.items():
            assert err <= TOLERANCE, f"{backend} {mode} {name}: {err:.2e}"
    assert all(err == 0 for name, err in results["per_rank"].items()
               if name != "digests_equal"), results["per_rank"]


def train(tmp_path, directory, *args):
    return mpiexec(sys.executable, "-m", "rescompile", "train", ROOT / "examples" / "digits.toml",
                   "--data", "digits", "--dtype", "float64", "--checkpoint", tmp_path / directory,
                   "--checkpoint-every", 3, "--check-replicas", 2, *args, cwd=tmp_path)


def test_resume_on_two_ranks_is_bit_identical(tmp_path):
    whole = train(tmp_path, "whole", "--steps", 6)
    assert whole.returncode == 0, whole.stderr
    assert "data-parallel on 2 ranks" in whole.stderr
    assert whole.stdout.count("test accuracy") == 1  # rank 0 alone reports
    first = train(tmp_path, "halves", "--steps", 3)
    assert first.returncode == 0, first.stderr
    second = train(tmp_path, "halves", "--steps", 6, "--resume")
    assert second.returncode == 0, second.stderr
    a = checkpoint.read(tmp_path / "whole" / "step-000006.npz")[1]
    b = checkpoint.read(tmp_path / "halves" / "step-000006.npz")[1]
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    state = json.loads((tmp_path / "whole" / "step-000006.json").read_text())
    assert state["ranks"] == 2 and state["batch_size"] == 64
    # One process goes on from two ranks' checkpoint: the same global batch.
    alone = subprocess.run(
        [sys.executable, "-m", "rescompile", "train", ROOT / "examples" / "digits.toml",
         "--data", "digits", "--checkpoint", tmp_path / "whole", "--steps", "7", "--resume"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "resuming a run of 2 rank(s) on 1: the same global batch of 64" in alone.stderr


@pytest.mark.parametrize("train_1, steps_1, code, words", [
    ({}, "3", 2, "rank 1 of 2: --steps 3 differs from rank 0's 2"),
    ({"weight_decay": 1e-3}, "2", 3,
     "rank 1 of 2: train.weight_decay: 0.001 in this rank's spec, 0.0002 in rank 0's"),
])
def test_ranks_that_disagree_stop_the_job_naming_the_difference(tmp_path, train_1, steps_1,
                                                                code, words):
    """Rank 1 started with another --steps (it would hang in an exchange) or another spec
    (a wrong model): the job ends within seconds, naming the flag or the spec field."""
    digits = ROOT / "examples" / "digits.toml"
    spec_1 = tmp_path / "digits-1.toml"
    spec_1.write_text(rc.load_spec(digits).replace(train=train_1).to_toml())
    command = [sys.executable, "-m", "rescompile", "train", "--data", "digits"]
    start = time.time()
    done = subprocess.run(
        [MPIEXEC, "-n", "1", *command, digits, "--steps", "2", ":",
         "-n", "1", *command, spec_1, "--steps", steps_1], capture_output=True, text=True,
        timeout=TIMEOUT_S, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path)
    assert done.returncode == code and words in done.stderr, done.stderr
    assert time.time() - start < 30


def test_uneven_batch_is_refused(tmp_path):
    done = train(tmp_path, "uneven", "--steps", 2, "--batch-size", 7)
    assert done.returncode == 4
    assert "does not split evenly across 2 ranks" in done.stderr
    assert not (tmp_path / "uneven").exists()


@pytest.mark.parametrize("how, code", [("raise", 4), ("kill", None)])
def test_a_failing_rank_ends_the_job(tmp_path, how, code):
    out = tmp_path / "fail"
    done = mpiexec(sys.executable, SCRIPT, "fail", how, out)
    ended = time.time()
    failed_at = float((tmp_path / "fail.failed_at").read_text())
    assert done.returncode != 0
    if code is not None:
        assert done.returncode == code
        assert "rank 1 of 2: injected failure on rank 1" in done.stderr
    assert ended - failed_at < 20, f"the job took {ended - failed_at:.1f} s to end"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_silent_rank_ends_the_job_at_the_exchange_deadline(tmp_path, backend):
    out = tmp_path / "silent"
    done = mpiexec(sys.executable, SCRIPT, "silent", backend, out)
    ended = time.time()
    started = float((tmp_path / "silent.started_at").read_text())
    assert done.returncode == 6, done.stderr
    assert "rank 0 of 2: exchanging batch-norm" in done.stderr, done.stderr
    assert "rank(s) 1 did not answer within 2 s" in done.stderr, done.stderr
    assert 2 <= ended - started < 20, f"the job took {ended - started:.1f} s to end"
