"""Every public method of an inference Executable on the cuda backend (tests/api_parity.py).
The train-mode methods on cuda are checked by test_parity.py (forward, loss, every gradient,
one step against the reference) and test_program.py (the train step in halves, device
arrays): under the simulator, running api_parity's train checks too would add three minutes."""

import cuda_helpers  # noqa: F401  (skips this module without a GPU or the simulator)

from api_parity import check_infer


def test_infer_methods(tmp_path):
    check_infer("cuda", "float32", tmp_path)
