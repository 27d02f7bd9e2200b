"""Every public method of Executable on the reference and cpu backends (tests/api_parity.py);
the cuda backend runs the same checks under the simulator (tests/cuda/test_api_parity.py)."""

import pytest

from api_parity import check_infer, check_train


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_infer_methods(backend, dtype, tmp_path):
    check_infer(backend, dtype, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_train_methods(backend, dtype, tmp_path):
    check_train(backend, dtype, tmp_path)
