"""The CUDA backend (simulated) against TensorFlow's numbers for the seed's basic unit, at the
oracle's tiny size (tests/data/tf_resnet_basic_tiny.npz: filters 4, 4, 8, 16, one unit per
stage, batch 2 of 8x8 images): eval and train logits, the loss, every gradient and one
momentum step. Tolerances as for the reference and cpu backends (tests/test_oracle.py):
float64 1e-10 forward and 1e-9 gradients, float32 1e-5 forward and 2e-5 gradients, relative
to each tensor's max."""

from pathlib import Path

import numpy as np
import pytest

import cuda_helpers  # noqa: F401  (skips this module without a GPU or the simulator)
import rescompile as rc
from rescompile.dump import kernel_label

DATA = Path(__file__).resolve().parents[1] / "data"
PRECISIONS = {"float64": ("f64/", 1e-10, 1e-9), "float32": ("", 1e-5, 2e-5)}
TINY_BASIC = rc.preset("seed-basic-small").replace(model={
    "input": [8, 8, 3], "stem_filters": 4,
    "stages": [{"filters": f, "units": 1, "stride": s} for f, s in ((4, 1), (8, 2), (16, 2))]})


@pytest.fixture(scope="module")
def oracle():
    with np.load(DATA / "tf_resnet_basic_tiny.npz") as z:
        return {k: z[k] for k in z.files}


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()
                 / np.abs(expected).max())


def executable(mode, dtype, oracle):
    exe = rc.compile(TINY_BASIC, mode=mode, backend="cuda", dtype=dtype)
    exe.load_params({n: oracle[f"before/{n}"] for n in exe.params})
    return exe


@pytest.mark.parametrize("dtype", list(PRECISIONS))
def test_eval_logits(oracle, dtype):
    prefix, forward_tol, _ = PRECISIONS[dtype]
    exe = executable("infer", dtype, oracle)
    assert "fused_conv2d[add_pooled|affine+relu]" in {kernel_label(n) for n in exe.graph.nodes}
    logits = exe.forward(oracle["images"])
    assert rel_err(logits, oracle[prefix + "eval/logits"]) < forward_tol


def test_loss_gradients_and_one_momentum_step_float32(oracle):
    """(float64 training adds a minute under the simulator and no code path of its own.) The
    graphs hold add_pooled in conv epilogues (both modes) and pool_pad_grad."""
    _, _, tol = PRECISIONS["float32"]
    exe = executable("train", "float32", oracle)
    labels = {kernel_label(n) for n in exe.graph.nodes}
    assert {"fused_conv2d[add_pooled]+stats", "pool_pad_grad"} <= labels, labels
    loss, grads = exe.loss_and_grads(oracle["images"], oracle["label_index"])
    assert abs(loss - oracle["train/cost_correct"]) < tol * abs(loss)
    for name, grad in grads.items():
        key = "grad_images" if name == "images" else f"grad/{name}"
        assert rel_err(grad, oracle[key]) < tol, name
    exe.train_step(oracle["images"], oracle["label_index"])
    for name, value in exe.params.items():
        key = f"after_nodebias/{name}" if "moving" in name else f"after/{name}"
        assert rel_err(value, oracle[key]) < tol, name
