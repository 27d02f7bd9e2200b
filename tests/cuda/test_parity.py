"""The CUDA backend (simulated) against the reference, entry by entry, on the unoptimised
graph and on what the pass pipeline makes of it (fused kernels included)."""

import numpy as np
import pytest

from rescompile.autodiff import SEED

from cuda_helpers import BATCH, TINY, Trio, assert_matches, feeds


@pytest.mark.parametrize("optimize", [False, True])
def test_infer(optimize):
    trio = Trio("infer", optimize)
    feed = feeds(trio.lowered)
    assert_matches(*trio.run("prepare", feed))
    assert_matches(*trio.run("forward", feed))


@pytest.mark.parametrize("optimize", [False, True])
def test_train_entries(optimize):
    trio = Trio("train", optimize)
    feed = feeds(trio.lowered)
    assert_matches(*trio.run("forward", feed))
    dlogits = np.random.default_rng(1).standard_normal((BATCH, 10)).astype(np.float32)
    backward = dict(feed, **{trio.graph.outputs["grad/logits"]: dlogits,
                             SEED: np.asarray(0, np.float32)})
    assert_matches(*trio.run("backward", backward))
    assert_matches(*trio.run("loss_and_grads", feed))
    assert_matches(*trio.run("train_step", feed))


def test_fused_ops_are_in_the_optimised_graphs():
    """The parity tests above cover fused kernels only if the passes made some."""
    ops = set(Trio("train").graph.count_ops()) | set(Trio("infer").graph.count_ops())
    assert {"fused_conv2d", "fold_bn_weights"} <= ops


def test_train_step_with_the_recipes():
    """Nesterov momentum, label smoothing and weight decay on every trainable (the cosine
    schedule only changes the fed learning rate): the update and smoothing kernels."""
    recipe = {"nesterov": True, "label_smoothing": 0.1, "weight_decay_on": "all"}
    trio = Trio("train", spec={**TINY, "train": recipe})
    assert {"nesterov_update", "smooth_labels"} <= set(trio.graph.count_ops())
    assert_matches(*trio.run("train_step", feeds(trio.lowered)))
