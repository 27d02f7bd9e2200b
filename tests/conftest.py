"""Shared fixtures: the TensorFlow oracle, small specs, and executables compiled once."""

import os
import subprocess
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

# The suite's micro-kernels go to a cache of its own, away from the user's. (They are compiled
# exactly as a user's are: at -O3, for this CPU. The one Numba function, the driver, is
# compiled at Numba's default level too: Numba's cache does not tell levels apart.)
os.environ.setdefault("RESCOMPILE_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".cache" / "test-kernels"))
# The derived kernel tiles, not measured ones: what a test pins does not depend on how fast
# this machine ran a candidate (tests/test_autotune.py measures on purpose).
os.environ["RESCOMPILE_TUNE"] = "0"

import numpy as np
import pytest

import rescompile as rc

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples"
ROOT = Path(__file__).resolve().parents[1]
SIMULATOR_TEST = "test_cuda_backend_under_the_simulator"


@dataclass
class SimulatorRun:
    """`pytest tests/cuda` under NUMBA_ENABLE_CUDASIM=1 in a process of its own."""
    process: subprocess.Popen
    log: object

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def pytest_collection_modifyitems(session, config, items):
    if any(item.name == SIMULATOR_TEST for item in items):
        log = tempfile.TemporaryFile()
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(ROOT / "tests" / "cuda")], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT)
        config.simulator_run = SimulatorRun(process, log)


def pytest_sessionfinish(session, exitstatus):
    run = getattr(session.config, "simulator_run", None)
    if run is not None and run.process.poll() is None:
        run.process.kill()


@pytest.fixture(scope="session")
def oracle():
    with np.load(DATA / "tf_resnet_small.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def seed_spec():
    return rc.load_spec(EXAMPLES / "seed_small.toml")


def oracle_params(oracle, names):
    return {n: oracle[f"before/{n}"] for n in names}


def rel_err(actual, expected, floor: float = 1e-30) -> float:
    """Max absolute difference relative to the expected tensor's max magnitude (or `floor`,
    for tensors that may be exactly zero)."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(), floor)
    return float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max() / scale)


def tiny_spec(**model):
    """A tiny valid spec for fast tests; keyword arguments override [model] fields."""
    base = {"input": [8, 8, 3], "num_classes": 5, "stem_filters": 4,
            "stages": [{"filters": 8, "units": 1, "stride": 1},
                       {"filters": 16, "units": 1, "stride": 2}],
            "activate_before_residual": [True, False]}
    base.update(model)
    return rc.load_spec({"name": "tiny", "model": base})


def random_bn_state(exe, seed=0):
    """Non-trivial BN parameters and statistics, so folding and normalising are exercised."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, value in exe.params.items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "gamma" or leaf == "moving_variance":
            values[name] = rng.uniform(0.5, 1.5, value.shape)
        elif leaf in ("beta", "moving_mean", "biases"):
            values[name] = rng.normal(0, 0.1, value.shape)
        else:
            values[name] = value
    return values


def peak_bytes(call, error) -> tuple[int, str]:
    """The most memory Python and NumPy allocations held during `call()`, which must raise
    `error`, and the error's message."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as caught:
            call()
        return tracemalloc.get_traced_memory()[1], str(caught.value)
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def infer_exe():
    """An inference executable on the cpu backend with non-trivial BN state."""
    exe = rc.compile(tiny_spec(), mode="infer", backend="cpu", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    return exe


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
