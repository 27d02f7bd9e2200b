"""PyTorch as an outside check: the same spec and weights through torch ops, in float64.

Agreement to 1e-10 relative is what two float64 implementations of the same arithmetic give
(summation order differs); random BN statistics make the infer-mode check meaningful.
"""

import numpy as np
import pytest

import rescompile as rc
from conftest import random_bn_state, rel_err, tiny_spec

torch = pytest.importorskip("torch")
from rescompile.interop.torch_model import to_nchw, torch_module  # noqa: E402

VARIANTS = {
    "v2-same": dict(),
    "v1-symmetric-conv2": dict(preactivation=False, stride_on="conv2", padding="symmetric",
                               relu_leakiness=0.0),
    "v1-imagenet-stem": dict(preactivation=False, stem="imagenet", input=[16, 16, 3],
                             padding="same"),
    "v2-basic-pool-pad": dict(unit="basic", shortcut="pool_pad"),
    "v1-wide": dict(preactivation=False, bottleneck_width=0.5, padding="symmetric"),
}


CASES = [(v, m, "reference") for v in VARIANTS for m in ("infer", "train")] + \
        [("v1-symmetric-conv2", m, "cpu") for m in ("infer", "train")]


@pytest.mark.parametrize("variant, mode, backend", CASES)
def test_logits_match_pytorch(variant, mode, backend):
    spec = tiny_spec(**VARIANTS[variant])
    exe = rc.compile(spec, mode=mode, backend=backend, dtype="float64", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    images = np.random.default_rng(3).standard_normal((3, *spec.model.input))
    module = torch_module(spec, exe.params, mode, "float64")
    expected = module(to_nchw(images)).detach().numpy()
    assert rel_err(exe.forward(images), expected) < 1e-10


def test_gradients_match_pytorch_autograd():
    spec = tiny_spec(preactivation=False, padding="symmetric", relu_leakiness=0.0)
    exe = rc.compile(spec, mode="train", dtype="float64", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    rng = np.random.default_rng(3)
    images, labels = rng.standard_normal((4, 8, 8, 3)), np.array([0, 1, 4, 2])
    module = torch_module(spec, exe.params, "train", "float64")
    logits = module(to_nchw(images))
    xent = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    xent.backward()
    exe.forward(images)
    grads = exe.backward(np.asarray((torch.softmax(logits, 1).detach().numpy()
                                     - np.eye(5)[labels]) / 4))
    for name, key in module.names.items():
        param = getattr(module, key)
        if isinstance(param, torch.nn.Parameter):
            expected = param.grad.numpy()
            if expected.ndim == 4:
                expected = expected.transpose(2, 3, 1, 0)
            assert rel_err(grads[name], expected) < 1e-10, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_runtime_agrees(variant):
    """The ONNX export used by the benchmarks computes the same model (float32, 1e-5)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from rescompile.interop.onnx_model import ort_runner
    spec = tiny_spec(**VARIANTS[variant])
    exe = rc.compile(spec, mode="infer", dtype="float32", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    images = np.random.default_rng(3).standard_normal((3, *spec.model.input)).astype(np.float32)
    assert rel_err(ort_runner(spec, exe.params, images)(), exe.forward(images)) < 1e-5
