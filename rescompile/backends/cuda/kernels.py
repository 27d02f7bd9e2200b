"""The CUDA kernel registry: op name -> lowering (node -> launches), one entry per op.

Adding an op to the backend means adding one line here (and its arithmetic to exprs.py if it
is elementwise). `check_supported` runs at compile time so a graph with an op we cannot run
fails before anything is generated, naming the node.
"""

from __future__ import annotations

from . import elementwise, exprs, gemm, head, pool, reduce
from ...errors import UsageError
from ...ops.fused import EPILOGUE_OPS

LOWER = {
    "conv2d": gemm.lower_conv,
    "fused_conv2d": reduce.lower_stats(gemm.lower_conv),
    "conv2d_grad_input": gemm.lower_conv_grad_input,
    "conv2d_grad_filter": gemm.lower_conv_grad_filter,
    "dense": gemm.lower_dense,
    "matmul": gemm.lower_matmul,
    "batch_norm": reduce.lower_batch_norm,
    "batch_norm_grad": reduce.lower_bn_grad,
    "batch_norm_relu_grad": reduce.lower_bn_grad,
    "batch_moments": reduce.lower_batch_moments,
    "fused_elementwise": reduce.lower_stats(elementwise.lower_elementwise),
    "sum_rows": reduce.lower_sum_rows,
    "global_avg_pool": reduce.lower_global_avg_pool,
    "l2_penalty": reduce.lower_l2_penalty,
    "global_avg_pool_grad": elementwise.lower_gap_grad,
    "softmax_cross_entropy": head.lower_xent,
    "softmax_cross_entropy_grad": head.lower_xent_grad,
    "max_pool": pool.lower_max_pool,
    "max_pool_grad": pool.lower_max_pool_grad,
    **{op: elementwise.lower_elementwise for op in (
        "relu", "relu_grad", "add", "bias_add", "affine", "l2_penalty_grad", "momentum_update",
        "nesterov_update", "sgd_update", "moving_average", "debiased_moving_average",
        "bn_affine_params", "fold_bn_weights", "batch_normalize", "smooth_labels")},
}


class UnsupportedOpError(NotImplementedError):
    """A node whose op (or epilogue step) has no CUDA kernel."""


# Ops that reduce over the ranks of a job run as host steps, which this backend has none of.
COLLECTIVE_OPS = ("sync_moments", "rank_mean")


def check_supported(nodes) -> None:
    for node in nodes:
        if node.op in COLLECTIVE_OPS:
            raise UsageError(f"node {node.name!r}: batch_norm.sync needs the cpu or reference "
                             f"backend (the cuda backend cannot synchronise statistics across "
                             f"ranks)")
        if node.op not in LOWER:
            raise UnsupportedOpError(f"node {node.name!r}: op {node.op!r} has no CUDA kernel "
                                     f"(backend 'cuda' supports {', '.join(sorted(LOWER))})")
        steps = list(node.attrs.get("epilogue", ())) + list(node.attrs.get("out2", ()))
        for step in steps:
            if step["op"] not in exprs.RULES or step["op"] not in EPILOGUE_OPS:
                raise UnsupportedOpError(f"node {node.name!r} ({node.op}): epilogue step "
                                         f"{step['op']!r} has no CUDA code")


def lower(ctx, node):
    return LOWER[node.op](ctx, node)
