"""The IR: SAME padding, shape inference over random specs, the verifier's messages, and the
published sizes of ResNet-164 and ResNet-50."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rescompile as rc
from strategies import small_specs
from rescompile import ops
from rescompile.build import build
from rescompile.dump import summary
from rescompile.ir import Graph, verify
from rescompile.padding import out_size, pads_2d


# TensorFlow's SAME padding, as TF pads these layers (not derived from padding.py's formula):
# (size, kernel, stride) -> (pad before, pad after, output size). The odd pixel goes after:
# ResNet-50's 7x7/2 stem on 224 pads (2, 3), its 3x3/2 pool on 112 pads (0, 1); the oracle's
# 3x3/2 convs on 16x16 pad (0, 1), which tests/test_oracle.py checks against TF's numbers.
SAME_TABLE = [
    (7, 1, 1, 0, 0, 7), (7, 3, 1, 1, 1, 7), (7, 7, 1, 3, 3, 7), (8, 3, 1, 1, 1, 8),
    (7, 1, 2, 0, 0, 4), (7, 3, 2, 1, 1, 4), (7, 7, 2, 3, 3, 4), (8, 1, 2, 0, 0, 4),
    (8, 3, 2, 0, 1, 4), (8, 7, 2, 2, 3, 4), (15, 3, 2, 1, 1, 8), (16, 3, 2, 0, 1, 8),
    (224, 7, 2, 2, 3, 112), (112, 3, 2, 0, 1, 56), (56, 1, 2, 0, 0, 28), (2, 3, 2, 0, 1, 1),
]


@pytest.mark.parametrize("size, k, stride, before, after, out", SAME_TABLE)
def test_same_padding_is_tensorflows(size, k, stride, before, after, out):
    assert pads_2d(size, size, k, stride, "same") == (before, after, before, after)
    assert out_size(size, k, stride, "same") == out


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_same_conv_equals_explicit_padding(size, k, stride):
    """The conv op with SAME padding equals a VALID conv of an explicitly padded input,
    computed here by a direct loop."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, size, size, 2)), rng.standard_normal((k, k, 2, 3))
    (y,) = ops.get("conv2d").reference({"stride": stride, "padding": "same"}, x, w)
    t, b, l, r = pads_2d(size, size, k, stride, "same")
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    for i in range(y.shape[1]):
        for j in range(y.shape[2]):
            patch = xp[0, i * stride:i * stride + k, j * stride:j * stride + k, :]
            # float64 sums of k*k*2 products in another order: within a few ulps
            np.testing.assert_allclose(y[0, i, j], np.einsum("hwc,hwco->o", patch, w),
                                       rtol=1e-12, atol=1e-12)


def test_symmetric_padding_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for k, stride, size in [(3, 1, 7), (3, 2, 8), (7, 2, 9), (1, 2, 8)]:
        x, w = rng.standard_normal((2, size, size, 3)), rng.standard_normal((k, k, 3, 4))
        (y,) = ops.get("conv2d").reference({"stride": stride, "padding": "symmetric"}, x, w)
        expected = torch.nn.functional.conv2d(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(3, 2, 0, 1),
            stride=stride, padding=k // 2).permute(0, 2, 3, 1).numpy()
        # float64 on both sides, summed in another order: within a few ulps
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_resnet164_size():
    info = summary(build(rc.preset("cifar-resnet164"), "infer").graph)
    assert info["trainable_params"] == 1_703_258
    assert round(info["flops_per_image"]["forward"] / 1e9, 3) == 0.489


def test_resnet50_size():
    info = summary(build(rc.preset("resnet50-imagenet"), "infer").graph)
    assert info["trainable_params"] == 25_557_032
    assert round(info["flops_per_image"]["forward"] / 1e9, 2) == 8.18


@settings(max_examples=30, deadline=None)
@given(small_specs(), st.sampled_from(["infer", "train"]))
def test_random_specs_build_verify_and_run(spec, mode):
    """Shape inference agrees with what the reference interpreter computes."""
    exe = rc.compile(spec, mode=mode, dtype="float64", optimize=False)
    verify(exe.graph)
    images = np.random.default_rng(0).standard_normal((2, *spec.model.input))
    assert exe.forward(images).shape == (2, spec.model.num_classes)
    for name, value in exe.program.values("forward").items():
        assert value.shape == exe.graph.value(name).concrete_shape(2), name


def test_verifier_names_the_node_with_a_wrong_shape():
    graph = build(rc.preset("seed-small"), "infer").graph
    node = graph.nodes[3]
    graph.values[node.outputs[0]] = graph.values[node.outputs[0]].__class__(
        node.outputs[0], (1, 2, 3, 4), "float64")
    with pytest.raises(rc.GraphError, match=f"node '{node.name}'.*shape rule gives"):
        verify(graph)


def test_verifier_names_a_use_before_definition():
    graph = build(rc.preset("seed-small"), "infer").graph
    graph.nodes[2], graph.nodes[5] = graph.nodes[5], graph.nodes[2]
    with pytest.raises(rc.GraphError, match="used before it is defined"):
        verify(graph)


def test_shape_errors_name_the_node():
    graph = Graph()
    graph.add_input("x", ("N", 8, 8, 3), "data")
    graph.add_input("w", (3, 3, 4, 8), "param")
    with pytest.raises(rc.GraphError, match="node 'bad' \\(conv2d\\): input has 3 channels"):
        graph.add_node("conv2d", ["x", "w"], {"stride": 1, "padding": "same"}, name="bad")


def test_a_value_is_defined_once():
    graph = Graph()
    graph.add_input("x", ("N", 4), "data")
    with pytest.raises(rc.GraphError, match="already defined"):
        graph.add_input("x", ("N", 4), "data")
