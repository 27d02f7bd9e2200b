"""Finite-difference checks, in float64, of every op's vector-Jacobian rule and of the whole
tiny model's loss gradient.

Each check compares <vjp(dy), v> with the central difference of <op(x), dy> along a random
direction v (step 1e-6): agreement to 1e-6 relative is what float64 central differences give
for smooth functions; random inputs keep ReLU and max-pool away from their kinks.
"""

import numpy as np
import pytest

import rescompile as rc
from rescompile import ops
from rescompile.autodiff import _GradBuilder
from rescompile.ir import Graph
from conftest import random_bn_state, tiny_spec

EPS = 1e-6
TOL = 1e-6


def vjp_check(op, attrs, inputs, differentiable, seed=0):
    """Build op(inputs) and its VJP in a graph, run both, compare with finite differences."""
    rng = np.random.default_rng(seed)
    graph = Graph(dtype="float64")
    names = [graph.add_input(f"in{i}", x.shape, "data") for i, x in enumerate(inputs)]
    outs = graph.add_node(op, names, attrs, name="op")
    out_values = ops.get(op).reference(attrs, *inputs)
    dys = [rng.standard_normal(np.shape(v)) for v in out_values]
    dy_names = [graph.add_input(f"dy{i}", np.shape(d), "data") for i, d in enumerate(dys)]
    builder = _GradBuilder(graph)
    builder.node = graph.nodes[0]
    grads = ops.get(op).vjp(builder, graph.nodes[0], *dy_names[:1], *[None] * (len(outs) - 1))
    env = dict(zip(names + dy_names + list(outs), list(inputs) + dys + list(out_values)))
    for node in graph.nodes[1:]:
        env.update(zip(node.outputs, ops.get(node.op).reference(node.attrs, *[env[i] for i in node.inputs])))

    def objective(xs):
        return float(np.sum(ops.get(op).reference(attrs, *xs)[0] * dys[0]))

    for index in differentiable:
        direction = rng.standard_normal(inputs[index].shape)
        plus, minus = list(inputs), list(inputs)
        plus[index] = inputs[index] + EPS * direction
        minus[index] = inputs[index] - EPS * direction
        numeric = (objective(plus) - objective(minus)) / (2 * EPS)
        analytic = float(np.sum(env[grads[index]] * direction))
        assert abs(numeric - analytic) <= TOL * max(1.0, abs(numeric)), (op, index)


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("size", [5, 6])
def test_conv2d(k, stride, padding, size):
    vjp_check("conv2d", {"stride": stride, "padding": padding},
              [rand(2, size, size + 1, 3), rand(k, k, 3, 4, seed=2)], [0, 1])


def test_batch_norm_train():
    vjp_check("batch_norm", {"epsilon": 1e-3, "training": True},
              [rand(3, 4, 5, 6) * 2 + 1, rand(6, seed=2) + 1.5, rand(6, seed=3)], [0, 1, 2])


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_relu(alpha):
    x = rand(2, 3, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5  # keep every entry away from the kink
    vjp_check("relu", {"alpha": alpha}, [x], [0])


def test_relu_gradient_at_zero_is_one():
    """TensorFlow's convention: the slope alpha applies where x < 0 only."""
    dy = np.ones((1, 1, 1, 3))
    x = np.array([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    (dx,) = ops.get("relu_grad").reference({"alpha": 0.1}, dy, x)
    assert dx.ravel().tolist() == [0.1, 1.0, 1.0]


def test_add():
    vjp_check("add", {}, [rand(2, 3, 3, 2), rand(2, 3, 3, 2, seed=2)], [0, 1])


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_max_pool(padding):
    vjp_check("max_pool", {"k": 3, "stride": 2, "padding": padding}, [rand(2, 7, 6, 3)], [0])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_avg_pool(k):
    """Odd sizes: the rows and columns that fill no block get no gradient."""
    vjp_check("avg_pool", {"k": k}, [rand(2, 7, 5, 3)], [0])


@pytest.mark.parametrize("op", ["pad_channels", "crop_channels"])
def test_channel_padding_and_cropping(op):
    vjp_check(op, {"before": 2, "after": 1}, [rand(2, 3, 3, 5)], [0])


def test_add_pooled_is_its_parts():
    """The fused shortcut add: add(x, pad_channels(avg_pool(s)))."""
    x, s = rand(2, 3, 2, 8), rand(2, 7, 5, 4, seed=2)
    attrs = {"k": 2, "before": 2, "after": 2}
    (fused,) = ops.get("add_pooled").reference(attrs, x, s)
    (pooled,) = ops.get("avg_pool").reference({"k": 2}, s)
    (padded,) = ops.get("pad_channels").reference({"before": 2, "after": 2}, pooled)
    np.testing.assert_array_equal(fused, x + padded)
    assert (padded[..., :2] == 0).all() and (padded[..., 6:] == 0).all()


def test_global_avg_pool():
    vjp_check("global_avg_pool", {}, [rand(2, 3, 4, 5)], [0])


def test_dense():
    vjp_check("dense", {}, [rand(3, 5), rand(5, 4, seed=2), rand(4, seed=3)], [0, 1, 2])


def test_softmax_cross_entropy():
    labels = np.eye(4)[[0, 3, 1]]
    vjp_check("softmax_cross_entropy", {}, [rand(3, 4) * 3, labels], [0])


def test_l2_penalty():
    vjp_check("l2_penalty", {"scale": 2e-4}, [rand(3, 3, 2, 4), rand(5, 2, seed=2)], [0, 1])


@pytest.mark.parametrize("preactivation", [True, False])
def test_whole_tiny_model(preactivation):
    """The full loss (cross-entropy + weight decay) against finite differences, through every
    parameter at once and through the images."""
    spec = tiny_spec(preactivation=preactivation, relu_leakiness=0.1)
    exe = rc.compile(spec, mode="train", dtype="float64", optimize=False, seed=4)
    exe.load_params(random_bn_state(exe, seed=5))
    rng = np.random.default_rng(6)
    images = rng.standard_normal((3, 8, 8, 3))
    labels = np.array([0, 4, 2])
    _, grads = exe.loss_and_grads(images, labels)
    base = dict(exe.params)
    directions = {n: rng.standard_normal(v.shape) for n, v in grads.items()}

    def loss_at(t):
        exe.load_params({n: v + t * directions[n] if n in directions else v
                         for n, v in base.items()})
        return exe.loss_and_grads(images + t * directions["images"], labels)[0]

    numeric = (loss_at(EPS) - loss_at(-EPS)) / (2 * EPS)
    analytic = sum(float(np.sum(grads[n] * d)) for n, d in directions.items())
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric))
