"""The reference and cpu backends against TensorFlow's own numbers for the seed's model, with
bottleneck units (tf_resnet_small.npz) and with basic units and the pooled, zero-padded
shortcut (tf_resnet_basic_small.npz, `seed-basic-small`).

Tolerances (relative to each tensor's max |value|): float64 against TF's float64 run at 1e-10
for the forward pass and 1e-9 for gradients and the step (TF's own float32/float64 gap is
1e-6, an independent float64 NumPy pass matched to 1e-14); float32 at 1e-5 for logits and
2e-5 for gradients (TF's float32 differs from its float64 by up to 6.4e-6), 1e-4 for eval-mode
activations deep in the net.
"""

import numpy as np
import pytest

import rescompile as rc
from conftest import DATA, oracle_params, rel_err

BACKENDS = ["reference", "cpu"]
PRECISIONS = {"float64": ("f64/", 1e-10, 1e-9), "float32": ("", 1e-5, 2e-5)}
MODELS = {"bottleneck": ("seed-small", "tf_resnet_small.npz"),
          "basic": ("seed-basic-small", "tf_resnet_basic_small.npz")}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(spec, oracle) of one unit kind."""
    preset, data = MODELS[request.param]
    with np.load(DATA / data) as z:
        return rc.preset(preset), {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def seed_spec(case):
    return case[0]


@pytest.fixture(scope="module")
def oracle(case):
    return case[1]


@pytest.fixture(scope="module", params=[(b, d, m) for b in BACKENDS for d in PRECISIONS
                                        for m in ("infer", "train")],
                ids=lambda p: "-".join(p))
def exe(request, seed_spec, oracle):
    backend, dtype, mode = request.param
    exe = rc.compile(seed_spec, mode=mode, backend=backend, dtype=dtype)
    exe.load_params(oracle_params(oracle, exe.params))
    return exe


def test_parameter_names_are_tf_names(seed_spec, oracle):
    exe = rc.compile(seed_spec, mode="infer")
    tf_names = {k[len("before/"):] for k in oracle if k.startswith("before/")} - {"global_step"}
    assert set(exe.params) == tf_names


def test_logits(exe, oracle):
    prefix, forward_tol, _ = PRECISIONS[exe.dtype]
    key = "eval/logits" if exe.mode == "infer" else "train/logits"
    assert rel_err(exe.forward(oracle["images"]), oracle[prefix + key]) < forward_tol


def test_loss_gradients_and_image_gradient(exe, oracle):
    if exe.mode != "train":
        pytest.skip("gradients need a train-mode executable")
    prefix, _, tol = PRECISIONS[exe.dtype]
    loss, grads = exe.loss_and_grads(oracle["images"], oracle["label_index"])
    assert abs(loss - oracle[prefix + "train/cost_correct"]) < tol * abs(loss)
    assert set(grads) == set(exe.params) - {n for n in exe.params if "moving" in n} | {"images"}
    for name, grad in grads.items():
        key = "grad_images" if name == "images" else f"grad/{name}"
        assert rel_err(grad, oracle[prefix + key]) < tol, name


def test_one_hot_labels_give_the_same_loss(exe, oracle):
    if exe.mode != "train":
        pytest.skip("loss needs a train-mode executable")
    loss_ids, _ = exe.loss_and_grads(oracle["images"], oracle["label_index"])
    loss_onehot, _ = exe.loss_and_grads(oracle["images"], oracle["labels"])
    assert loss_ids == loss_onehot


@pytest.mark.parametrize("zero_debias", [False, True])
def test_train_step_matches_tf(seed_spec, oracle, zero_debias):
    for dtype, (prefix, _, tol) in PRECISIONS.items():
        spec = seed_spec.replace(batch_norm={"zero_debias": zero_debias})
        exe = rc.compile(spec, mode="train", dtype=dtype)
        exe.load_params(oracle_params(oracle, exe.params))
        exe.train_step(oracle["images"], oracle["label_index"])
        assert exe.step == 1
        for name, value in exe.params.items():
            if "moving" in name:
                key = prefix + ("after/" if zero_debias else "after_nodebias/") + name
                expected = oracle[key]
            elif prefix:  # TF's float64 run stores gradients; its step is before - lr * grad
                expected = oracle[f"before/{name}"] - 0.1 * oracle[f"f64/grad/{name}"]
            else:
                expected = oracle[f"after/{name}"]
            assert rel_err(value, expected) < tol, (dtype, name)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_per_unit_activations_float32(seed_spec, oracle, mode):
    exe = rc.compile(seed_spec, mode=mode, dtype="float32", optimize=False)
    exe.load_params(oracle_params(oracle, exe.params))
    exe.forward(oracle["images"])
    values = exe.program.values("forward")
    tag = "act_eval" if mode == "infer" else "act_train"
    for unit, value_name in exe.lowered.model.activations.items():
        deep = unit.startswith("unit_3") or unit == "unit_last"
        tol = 1e-4 if mode == "infer" and deep else 1e-5
        assert rel_err(values[value_name], oracle[f"{tag}/{unit}"]) < tol, unit


def test_batch_statistics_match_tf(seed_spec, oracle):
    exe = rc.compile(seed_spec, mode="train", dtype="float64", optimize=False)
    exe.load_params(oracle_params(oracle, exe.params))
    exe.forward(oracle["images"])
    values = exe.program.values("forward")
    for node in exe.graph.nodes:
        if node.op == "batch_norm":
            _, mean, var = node.outputs
            assert rel_err(values[mean], oracle[f"f64/train/batch_mean/{node.scope}"]) < 1e-10
            assert rel_err(values[var], oracle[f"f64/train/batch_var/{node.scope}"]) < 1e-10
