"""ONNX in and out: `rescompile export` writes a checked ONNX model that ONNX Runtime runs to
rescompile's logits (basic units and the pooled shortcut too); `import-onnx` reads it back as
the same spec and bitwise the same weights; torchvision-layout ResNet-50, ResNet-18, ResNet-34
and Wide ResNet-50-2 exported by torch.onnx.export, with the TorchScript exporter and with the
default (dynamo) one, import to the module's own logits; bad files are refused naming the
node. The CLI's torch import and eval/predict on an artifact are here too. Tolerances: ORT
against rescompile 1e-5 (float32 rounding of two implementations, measured 2.3e-7); the torch
export in float64 1e-10 (measured 3.6e-15), in float32 2e-5 (measured 1.7e-6)."""

import dataclasses

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

import rescompile as rc  # noqa: E402
from conftest import random_bn_state, rel_err, tiny_spec  # noqa: E402
from rescompile import checkpoint  # noqa: E402
from rescompile.cli import main  # noqa: E402
from rescompile.interop import from_onnx  # noqa: E402
from torch_layouts import (TorchvisionResNet, randomized, resnet18, resnet34,  # noqa: E402
                           wide_resnet50_2)

CIFAR = tiny_spec(unit="bottleneck")  # a pre-activation CIFAR ResNet
# The seed's basic units: a stride-1 unit that widens (a pad alone), then a pool and a pad.
BASIC = tiny_spec(unit="basic", shortcut="pool_pad")
TORCHVISION = {"resnet18-imagenet": resnet18, "resnet34-imagenet": resnet34,
               "wide-resnet50-2-imagenet": wide_resnet50_2}


@pytest.fixture(scope="module", params=[CIFAR, BASIC], ids=["bottleneck", "basic"])
def exported(request, tmp_path_factory):
    """A trained-looking checkpoint of a CIFAR spec, exported with the CLI."""
    d = tmp_path_factory.mktemp("onnx")
    spec = request.param
    exe = rc.compile(spec, mode="infer", backend="reference", dtype="float32", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    exe.save(d / "ckpt.npz")
    (d / "spec.toml").write_text(spec.to_toml())
    assert main(["export", str(d / "spec.toml"), "--checkpoint", str(d / "ckpt.npz"),
                 "-o", str(d / "model.onnx")]) == 0
    return d, exe


def test_export_is_checked_and_ort_matches(exported):
    ort = pytest.importorskip("onnxruntime")
    d, exe = exported
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32)
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"images": x.transpose(0, 3, 1, 2)})[0]
    assert rel_err(theirs, exe.forward(x)) <= 1e-5


def test_export_then_import_is_bitwise_the_same(exported, tmp_path):
    d, exe = exported
    assert main(["import-onnx", str(d / "model.onnx"), "-o", str(tmp_path / "back.npz"),
                 "--spec-out", str(tmp_path / "back.toml")]) == 0
    assert rc.load_spec(tmp_path / "back.toml") == exe.spec
    back = checkpoint.read(tmp_path / "back.npz")[1]
    assert sorted(back) == sorted(exe.params)
    for name, value in exe.params.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return randomized(TorchvisionResNet())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 2e-5)])
def test_torch_exported_resnet50_imports_to_its_logits(resnet50, tmp_path, dtype, tolerance,
                                                        backend):
    module = resnet50.double() if dtype == "float64" else resnet50.float()
    x = torch.randn(2, 3, 64, 64, dtype=module.fc.weight.dtype)
    torch.onnx.export(module, (x,), str(tmp_path / "r50.onnx"), opset_version=17,
                      dynamo=False)
    spec, params = from_onnx(tmp_path / "r50.onnx")
    preset = rc.preset("resnet50-imagenet")
    assert spec.model == dataclasses.replace(preset.model, input=(64, 64, 3))
    exe = rc.compile(spec, backend=backend, dtype=dtype)
    exe.load_params(params)
    with torch.no_grad():
        theirs = module(x).double().numpy()
    assert rel_err(exe.forward(x.permute(0, 2, 3, 1).numpy()), theirs) <= tolerance


@pytest.fixture(scope="module", params=[
    ("resnet18-imagenet", "torchscript"), ("resnet18-imagenet", "dynamo"),
    ("resnet34-imagenet", "torchscript"), ("wide-resnet50-2-imagenet", "dynamo")],
    ids="-".join)
def torch_exported(request, tmp_path_factory):
    """(preset, the module in float64, its float64 export's import at 32x32), exported by
    torch's TorchScript exporter (opset 17) or its default one (dynamo, onnxscript). The basic
    block goes through both; each other layout through one (an export of the 69M-weight wide
    network takes 10 s)."""
    preset, exporter = request.param
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")  # what torch's default exporter is written in
    torch.manual_seed(3)
    module = randomized(TORCHVISION[preset](), seed=3).double()
    path = tmp_path_factory.mktemp("torch") / "model.onnx"
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    options = {"dynamo": True} if exporter == "dynamo" else {"dynamo": False,
                                                             "opset_version": 17}
    torch.onnx.export(module, (x,), str(path), **options)
    return preset, module, from_onnx(path)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 2e-5)])
def test_both_exporters_basic_and_wide_resnets_import_to_their_logits(torch_exported, backend,
                                                                      dtype, tolerance):
    """The float32 run takes the float64 file's weights, rounded as module.float() rounds
    them, and is compared with the module in float32."""
    preset, module, (spec, params) = torch_exported
    assert spec.model == rc.preset(preset).replace(model={"input": [32, 32, 3]}).model
    exe = rc.compile(spec, backend=backend, dtype=dtype)
    exe.load_params(params)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
    module = module.double() if dtype == "float64" else module.float()
    with torch.no_grad():
        theirs = module(torch.tensor(x, dtype=module.fc.weight.dtype)).double().numpy()
    assert rel_err(exe.forward(x.transpose(0, 2, 3, 1)), theirs) <= tolerance


def _edited(exported, tmp_path, change):
    model = onnx.load(str(exported[0] / "model.onnx"))
    change(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _torch_model(tmp_path, change):
    module = randomized(TorchvisionResNet(layers=(1, 1), num_classes=5, base=8))
    torch.onnx.export(module, (torch.randn(1, 3, 32, 32),), str(tmp_path / "t.onnx"),
                      opset_version=17, dynamo=False)
    model = onnx.load(str(tmp_path / "t.onnx"))
    change(model)
    onnx.save(model, str(tmp_path / "t.onnx"))
    return tmp_path / "t.onnx"


def _first(model, ops):
    return next(n for n in model.graph.node if n.op_type in ops)


def test_bad_onnx_files_are_refused_naming_the_node(exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(rc.InputError, match="garbage.onnx: not a readable ONNX model"):
        from_onnx(garbage)
    relu = lambda m: setattr(_first(m, ("Relu", "LeakyRelu")), "op_type",  # noqa: E731
                             "Sigmoid")
    with pytest.raises(rc.InputError, match=r"node .* \(Sigmoid\) is not what spec 'tiny' "
                                            r"exports"):
        from_onnx(_edited(exported, tmp_path, relu))
    extra = lambda m: m.graph.initializer.append(  # noqa: E731
        onnx.numpy_helper.from_array(np.zeros(2, np.float32), "payload"))
    with pytest.raises(rc.InputError, match="initializer 'payload' is not a variable"):
        from_onnx(_edited(exported, tmp_path, extra))
    with pytest.raises(rc.InputError, match=r"\(Sigmoid\) does not fit a ResNet v1"):
        from_onnx(_torch_model(tmp_path, relu))


def test_import_torch_cli_and_an_artifact_for_eval_and_predict(tmp_path, capsys):
    module = randomized(TorchvisionResNet(layers=(1, 1), num_classes=10, base=8))
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    assert main(["import-torch", str(tmp_path / "weights.pt"), "--input", "8", "8",
                 "-o", str(tmp_path / "ckpt.npz"), "--spec-out", str(tmp_path / "s.toml")]) == 0
    spec = rc.load_spec(tmp_path / "s.toml")
    exe = rc.load(tmp_path / "ckpt.npz")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        theirs = module(torch.tensor(x)).numpy()
    assert rel_err(exe.forward(x.transpose(0, 2, 3, 1)), theirs) <= 2e-5
    assert main(["compile", str(tmp_path / "s.toml"), "--checkpoint", str(tmp_path / "ckpt.npz"),
                 "-o", str(tmp_path / "m.rcx")]) == 0
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), np.float32) + 0.5)
    assert main(["predict", str(tmp_path / "s.toml"), "--checkpoint", str(tmp_path / "m.rcx"),
                 str(tmp_path / "images.npy")]) == 0
    assert main(["eval", str(tmp_path / "s.toml"), "--checkpoint", str(tmp_path / "m.rcx"),
                 "--data", "synthetic"]) == 0
    assert f"{spec.name} at step 0 on synthetic" in capsys.readouterr().out
