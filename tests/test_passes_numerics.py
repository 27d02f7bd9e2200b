"""Differential tests of the pipelines, in the style of ONNX Runtime's graph-transformer tests:
random small specs and random BN statistics, the graph run with optimisations off and on, every
public output compared (logits; in train also the loss, every gradient, every update), and the
rewritten graph's structure checked alongside. Also the optimised graph against TensorFlow."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rescompile as rc
from rescompile.compiler import lower
from rescompile.check import evaluate, random_feeds, relative_change
from conftest import EXAMPLES, oracle_params, rel_err
from strategies import residual_units

# Relative to each output's max. The passes reassociate arithmetic (folded weights are
# W * gamma / sqrt(var + eps) in float64, cast once; epilogues reorder a few adds), so the
# optimised graph differs by rounding only: a few float32 ulps per layer over a few layers
# (1e-5), float64's the same (1e-10).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@st.composite
def small_specs(draw):
    """Either stem, unit kind, shortcut and bottleneck width; one or two stages."""
    stem = draw(st.sampled_from(["cifar", "imagenet"]))
    n_stages = draw(st.integers(1, 2))
    stages = [{"filters": draw(st.sampled_from([8, 16])), "units": draw(st.integers(1, 2)),
               "stride": draw(st.sampled_from([1, 2]))} for _ in range(n_stages)]
    size = 8 if stem == "cifar" else 16
    return rc.load_spec({"name": "random", "model": {
        "input": [size, size, 3], "num_classes": 5, "stem": stem, "stem_filters": 4,
        "preactivation": draw(st.booleans()), "stride_on": draw(st.sampled_from(["conv1",
                                                                                 "conv2"])),
        "padding": draw(st.sampled_from(["same", "symmetric"])),
        **draw(residual_units(4, stages)),
        "activate_before_residual": [draw(st.booleans()) for _ in stages],
        "relu_leakiness": draw(st.sampled_from([0.0, 0.1]))}})


def assert_pipeline_keeps_numbers(spec, mode, dtype, seed):
    plain = lower(spec, mode, dtype, optimize=False)
    optimized = lower(spec, mode, dtype, verify_each=True)
    feeds = random_feeds(plain, batch=3, seed=seed)
    before, after = evaluate(plain.graph, feeds), evaluate(optimized.graph, feeds)
    assert optimized.graph.outputs.keys() == plain.graph.outputs.keys()
    for key, value in plain.graph.outputs.items():
        change = relative_change(before[value], after[optimized.graph.outputs[key]])
        assert change <= TOLERANCE[dtype], (key, change)
    return optimized.graph.count_ops()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=small_specs(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2 ** 16))
def test_infer_pipeline_keeps_numbers(spec, dtype, seed):
    ops = assert_pipeline_keeps_numbers(spec, "infer", dtype, seed)
    assert not {"batch_norm", "relu", "affine", "add", "bias_add", "add_pooled", "avg_pool",
                "pad_channels"} & set(ops), ops


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=small_specs(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2 ** 16))
def test_train_pipeline_keeps_numbers(spec, dtype, seed):
    ops = assert_pipeline_keeps_numbers(spec, "train", dtype, seed)
    assert not {"batch_norm", "fold_bn_weights", "bn_affine_params"} & set(ops), ops


@pytest.mark.parametrize("dtype, key, tol", [("float64", "f64/eval/logits", 1e-10),
                                             ("float32", "eval/logits", 1e-5)])
def test_optimized_infer_graph_matches_tensorflow(oracle, dtype, key, tol):
    exe = rc.compile(EXAMPLES / "seed_small.toml", mode="infer", dtype=dtype)
    assert "batch_norm" not in exe.graph.count_ops()
    exe.load_params(oracle_params(oracle, exe.params))
    assert rel_err(exe.forward(oracle["images"]), oracle[key]) < tol


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_runtime_entries_agree_with_and_without_passes(mode):
    """Through the Executable: prepare + forward in infer; backward(dlogits) and a train step
    (with its updates) in train."""
    spec = EXAMPLES / "seed_small.toml"
    runs = []
    for optimize in (False, True):
        exe = rc.compile(spec, mode=mode, dtype="float64", optimize=optimize)
        feeds = random_feeds(exe.lowered, seed=1)
        exe.load_state({n: v for n, v in feeds.items() if n in exe.state})
        rng = np.random.default_rng(2)
        images = rng.standard_normal((3, 16, 16, 3))
        results = {"logits": exe.forward(images)}
        if mode == "train":
            results.update(exe.backward(rng.standard_normal((3, 10))))
            results["loss"] = exe.train_step(images, np.array([1, 2, 3]))
            results.update({f"new/{k}": v for k, v in exe.state.items()})
        runs.append(results)
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert relative_change(runs[0][key], runs[1][key]) <= 1e-10, key
