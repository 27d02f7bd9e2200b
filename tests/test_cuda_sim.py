"""The CUDA backend: its tests run under Numba's simulator in a subprocess (the variable must be
set before numba is imported), and without a GPU or the simulator it fails clearly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_backend_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "cuda")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_without_a_gpu_cuda_fails_with_a_clear_error(monkeypatch):
    import rescompile
    from rescompile.backends.cuda import CudaUnavailableError, device
    monkeypatch.setattr(device, "available", lambda: False)
    with pytest.raises(CudaUnavailableError, match="needs an NVIDIA GPU.*NUMBA_ENABLE_CUDASIM"):
        rescompile.compile(ROOT / "rescompile" / "presets" / "seed_small.toml", backend="cuda")
    assert issubclass(CudaUnavailableError, RuntimeError)
