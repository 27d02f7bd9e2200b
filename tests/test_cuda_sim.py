"""The CUDA backend: its tests run under Numba's simulator in a subprocess (the variable must be
set before numba is imported), and without a GPU or the simulator it fails clearly.

The subprocess starts right after collection (tests/conftest.py) and runs beside the rest of
the suite, which mostly compiles kernels on one core: the simulator takes the other."""

import pytest

from conftest import ROOT


def test_cuda_backend_under_the_simulator(request):
    run = request.config.simulator_run
    returncode = run.process.wait(timeout=900)
    assert returncode == 0, run.output()[-6000:]


def test_without_a_gpu_cuda_fails_with_a_clear_error(monkeypatch):
    import rescompile
    from rescompile.backends.cuda import CudaUnavailableError, device
    monkeypatch.setattr(device, "available", lambda: False)
    with pytest.raises(CudaUnavailableError, match="needs an NVIDIA GPU.*NUMBA_ENABLE_CUDASIM"):
        rescompile.compile(ROOT / "rescompile" / "presets" / "seed_small.toml", backend="cuda")
    assert issubclass(CudaUnavailableError, RuntimeError)
