"""Tiny specs and the comparison the CUDA tests share.

These tests run only under the simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported)
or with a GPU: in a plain `pytest` run each module skips itself on import (a conftest.py here
would replace tests/conftest.py as the `conftest` module the other tests import from), and
tests/test_cuda_sim.py runs them in a simulator subprocess instead.
"""

import os

import numpy as np
import pytest


def _runnable() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    from numba import cuda
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


if not _runnable():
    pytest.skip("CUDA tests need a GPU or NUMBA_ENABLE_CUDASIM=1 (tests/test_cuda_sim.py runs "
                "them in the simulator)", allow_module_level=True)

from rescompile.autodiff import LEARNING_RATE, SEED
from rescompile.backends import cuda as cuda_backend
from rescompile.backends import reference
from rescompile.compiler import lower
from rescompile.entries import make_entries
from rescompile.init import initial_values

TINY = {"name": "tiny", "model": {
    "input": [8, 8, 3], "num_classes": 10, "stem": "cifar", "stem_filters": 4,
    "unit": "bottleneck", "preactivation": True, "stride_on": "conv1", "padding": "same",
    "stages": [{"filters": 8, "units": 1, "stride": 1}, {"filters": 16, "units": 1, "stride": 2}],
    "activate_before_residual": [True, False], "relu_leakiness": 0.1}}
BATCH = 2


class Trio:
    """One graph on the CUDA backend and on the reference in float32 and float64."""

    def __init__(self, mode, optimize=True, spec=TINY, **options):
        self.lowered = lower(spec, mode, "float32", optimize=optimize, backend="cuda")
        self.graph = self.lowered.graph
        entries = make_entries(self.graph, mode)
        self.cuda = cuda_backend.compile_program(self.graph, entries, dtype="float32", **options)
        self.ref32 = reference.compile_program(self.graph, entries, "float32")
        self.ref64 = reference.compile_program(self.graph, entries, "float64")

    def run(self, entry, feed):
        feed64 = {k: np.asarray(v, np.float64) for k, v in feed.items()}
        return self.cuda.run(entry, feed), self.ref32.run(entry, feed), \
            self.ref64.run(entry, feed64)


def feeds(lowered, seed=0):
    """Variables with non-trivial BN statistics, images, labels, seed and learning rate."""
    rng = np.random.default_rng(seed)
    values = initial_values(lowered.variables, seed, "float32")
    for name in values:
        if name.endswith(("gamma", "beta", "moving_mean", "moving_variance")):
            shift = 1.0 if name.endswith(("gamma", "moving_variance")) else 0.0
            values[name] = (shift + 0.3 * rng.random(values[name].shape)).astype(np.float32)
    classes = lowered.spec.model.num_classes
    values.update(images=rng.standard_normal((BATCH, 8, 8, 3)).astype(np.float32),
                  labels=np.eye(classes, dtype=np.float32)[rng.integers(0, classes, BATCH)])
    values[SEED] = np.asarray(1, np.float32)
    values[LEARNING_RATE] = np.asarray(0.1, np.float32)
    return values


def assert_matches(cuda_out, ref32, ref64, tol=1e-5):
    """Within tol of each tensor's max, against the float64 reference of the same graph and
    inputs; and against the float32 reference within 2*tol (its own float32 sums in cancelling
    reductions such as a BN dgamma are sometimes the less accurate of the two)."""
    assert set(cuda_out) == set(ref32)
    for name in ref32:
        scale = float(np.max(np.abs(ref64[name]))) or 1.0
        got = np.asarray(cuda_out[name], np.float64)
        assert got.shape == np.shape(ref32[name]), name
        assert np.max(np.abs(got - ref64[name])) <= tol * scale, name
        assert np.max(np.abs(got - ref32[name])) <= 2 * tol * scale, name
