"""The seed's basic unit with its pooled, zero-padded shortcut on the CUDA backend (simulated)
against the reference: unoptimised (avg_pool, pad_channels and their gradients as kernels of
their own), optimised (add_pooled in a conv's epilogue) and, after a v1 unit's batch norm in
training, add_pooled in an elementwise kernel."""

import pytest

from cuda_helpers import TINY, Trio, assert_matches, feeds
from rescompile.dump import kernel_label

BASIC = {**TINY, "model": {**TINY["model"], "unit": "basic", "shortcut": "pool_pad",
                           "stages": [{"filters": 4, "units": 1, "stride": 1},
                                      {"filters": 8, "units": 1, "stride": 2}]}}


@pytest.mark.parametrize("mode, optimize, preactivation, kernel", [
    ("train", False, True, "avg_pool_grad"),
    ("infer", True, True, "fused_conv2d[add_pooled+affine+relu]"),
    ("train", True, False, "fused_elementwise[batch_normalize+add_pooled|relu]"),
])
def test_basic_pool_pad_units(mode, optimize, preactivation, kernel):
    spec = {**BASIC, "model": {**BASIC["model"], "preactivation": preactivation}}
    trio = Trio(mode, optimize, spec=spec)
    assert kernel in {kernel_label(n) for n in trio.graph.nodes}
    feed = feeds(trio.lowered)
    if mode == "infer":
        assert_matches(*trio.run("prepare", feed))
        assert_matches(*trio.run("forward", feed))
    else:
        assert_matches(*trio.run("loss_and_grads", feed))
