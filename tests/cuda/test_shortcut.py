"""The seed's basic unit with its pooled, zero-padded shortcut on the CUDA backend (simulated)
against the reference: unoptimised (avg_pool, pad_channels and their gradients as kernels of
their own) and, after a v1 unit's batch norm in training, add_pooled in an elementwise kernel.
(add_pooled in a conv's epilogue, and pool_pad_grad, are in test_oracle_basic.py's graphs.)"""

import pytest

from cuda_helpers import TINY, Trio, assert_matches, feeds
from rescompile.dump import kernel_label

BASIC = {**TINY, "model": {**TINY["model"], "unit": "basic", "shortcut": "pool_pad",
                           "stages": [{"filters": 4, "units": 1, "stride": 1},
                                      {"filters": 8, "units": 1, "stride": 2}]}}


@pytest.mark.parametrize("optimize, preactivation, kernel", [
    (False, True, "avg_pool_grad"),
    (True, False, "fused_elementwise[batch_normalize+add_pooled|relu]"),
])
def test_basic_pool_pad_units_train(optimize, preactivation, kernel):
    spec = {**BASIC, "model": {**BASIC["model"], "preactivation": preactivation}}
    trio = Trio("train", optimize, spec=spec)
    assert kernel in {kernel_label(n) for n in trio.graph.nodes}
    assert_matches(*trio.run("loss_and_grads", feeds(trio.lowered)))
