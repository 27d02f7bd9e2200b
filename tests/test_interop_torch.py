"""Importing PyTorch ResNets (`rescompile.interop.from_torch`): torchvision-layout ResNet-50
(64x64 images, to keep the float64 reference quick), ResNet-18 and ResNet-34 (basic blocks)
and Wide ResNet-50-2 (32x32 images), and a CIFAR pre-activation ResNet, with random weights
and non-trivial BN statistics, give the module's own eval-mode logits, on the reference and
cpu backends. Tolerances: float64 1e-10 (float64 rounding over 50 layers, measured 4e-15 at
most); float32 2e-5 (float32 rounding of both sides, measured 1.5e-6 at most). Bad state dicts
are refused naming the tensor."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rescompile as rc  # noqa: E402
from conftest import rel_err  # noqa: E402
from rescompile.interop import from_torch  # noqa: E402
from torch_layouts import (PreActResNet, TorchvisionResNet, randomized, resnet18,  # noqa: E402
                           resnet34, wide_resnet50_2)

TOLERANCE = {"float64": 1e-10, "float32": 2e-5}
TORCHVISION = {"resnet18-imagenet": resnet18, "resnet34-imagenet": resnet34,
               "wide-resnet50-2-imagenet": wide_resnet50_2}


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return randomized(TorchvisionResNet()).double()


@pytest.fixture(scope="module")
def preact():
    torch.manual_seed(1)
    return randomized(PreActResNet(), seed=1).double()


def images(size, n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size))


def their_logits(module, x, dtype):
    module = module.to(torch.float64 if dtype == "float64" else torch.float32)
    with torch.no_grad():
        return module(torch.tensor(x, dtype=module.fc.weight.dtype if hasattr(module, "fc")
                                   else module.linear.weight.dtype)).double().numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torchvision_resnet50_gives_the_modules_logits(resnet50, backend, dtype):
    spec, params = from_torch(resnet50, input=(64, 64))
    assert spec.model.stages[2].units == 6 and spec.batch_norm.epsilon == 1e-5
    preset = rc.preset("resnet50-imagenet")
    assert spec.model == dataclasses.replace(preset.model, input=(64, 64, 3))
    assert spec.batch_norm == preset.batch_norm
    assert len(params) == 267
    exe = rc.compile(spec, backend=backend, dtype=dtype)
    exe.load_params(params)
    x = images(64)
    ours = exe.forward(x.transpose(0, 2, 3, 1))
    assert rel_err(ours, their_logits(resnet50, x, dtype)) <= TOLERANCE[dtype]


@pytest.fixture(scope="module", params=list(TORCHVISION))
def torchvision_model(request):
    """(preset, module in float64, its import at 32x32)."""
    torch.manual_seed(2)
    module = randomized(TORCHVISION[request.param](), seed=2).double()
    return request.param, module, from_torch(module, input=(32, 32))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torchvision_basic_and_wide_resnets_give_the_modules_logits(torchvision_model, backend,
                                                                   dtype):
    preset, module, (spec, params) = torchvision_model
    assert spec.model == rc.preset(preset).replace(model={"input": [32, 32, 3]}).model
    exe = rc.compile(spec, backend=backend, dtype=dtype)
    exe.load_params(params)
    x = images(32, seed=3)
    ours = exe.forward(x.transpose(0, 2, 3, 1))
    assert rel_err(ours, their_logits(module, x, dtype)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_preactivation_cifar_resnet_gives_the_modules_logits(preact, backend):
    spec, params = from_torch(preact.state_dict())
    assert spec.model.preactivation and spec.model.stem == "cifar"
    exe = rc.compile(spec, backend=backend, dtype="float64")
    exe.load_params(params)
    x = images(32, seed=1)
    assert rel_err(exe.forward(x.transpose(0, 2, 3, 1)),
                   their_logits(preact, x, "float64")) <= TOLERANCE["float64"]


def test_a_given_spec_is_checked_against_the_weights(preact):
    spec, _ = from_torch(preact)
    with pytest.raises(rc.InputError, match="model.num_classes is 5, but the weights "
                                            "describe 10"):
        from_torch(preact, spec=spec.replace(model={"num_classes": 5}))
    assert from_torch(preact, spec=spec)[0] == spec


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update({"layer1.0.extra.weight": torch.zeros(1)}),
     "tensor 'layer1.0.extra.weight' has no place in"),
    (lambda s: s.pop("layer2.1.conv2.weight"),
     "tensor 'layer2.1.conv2.weight' is missing \\(it would be 'unit_2_1/sub2/conv2/DW'\\)"),
    (lambda s: s.update({"layer1.0.bn2.running_var": torch.ones(3)}),
     "tensor 'layer1.0.bn2.running_var': shape \\[3\\] does not fit"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("layer1.0.conv3")],
     "tensor 'layer1.0.bn3.bias' has no place in 'preact-resnet10'"),
    (lambda s: s.pop("conv1.weight"), "not a supported ResNet"),
])
def test_bad_state_dicts_are_refused_naming_the_tensor(preact, change, words):
    state = dict(preact.state_dict())
    change(state)
    with pytest.raises(rc.InputError, match=words):
        from_torch(state)
