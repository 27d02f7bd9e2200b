"""The CUDA kernel registry: op name -> lowering (node -> launches), one entry per op.

Adding an op to the backend means adding one line here (and its arithmetic to exprs.py if it
is elementwise). `check_supported` runs at compile time so a graph with an op we cannot run
fails before anything is generated, naming the node.
"""

from __future__ import annotations

from . import elementwise, exprs, gemm, head, pool, reduce
from ...errors import UsageError
from ...ops.registry import kind_of, ops_of_kind

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
    "avg_pool": pool.lower_pool_pad,
    "pad_channels": pool.lower_pool_pad,
    "avg_pool_grad": pool.lower_spread,
    "crop_channels": pool.lower_spread,
    "pool_pad_grad": pool.lower_spread,
}
# Every other op with an expression (exprs.RULES) is one elementwise kernel.
LOWER.update({op: elementwise.lower_elementwise for op in exprs.RULES if op not in LOWER})


class UnsupportedOpError(NotImplementedError):
    """A node whose op (or epilogue step) has no CUDA kernel."""


def supports(op: str) -> bool:
    """Whether this backend has a kernel for op."""
    return op in LOWER


def check_supported(nodes) -> None:
    # Ops that reduce over the ranks of a job run as host steps, which this backend has none
    # of: said first, whatever else a synchronised graph holds.
    for node in nodes:
        if kind_of(node.op) == "collective":
            raise UsageError(f"node {node.name!r}: batch_norm.sync needs the cpu or reference "
                             f"backend (the cuda backend cannot synchronise statistics across "
                             f"ranks)")
    for node in nodes:
        if node.op not in LOWER:
            raise UnsupportedOpError(f"node {node.name!r}: op {node.op!r} has no CUDA kernel "
                                     f"(backend 'cuda' supports {', '.join(sorted(LOWER))})")
        steps = list(node.attrs.get("epilogue", ())) + list(node.attrs.get("out2", ()))
        for step in steps:
            if step["op"] not in exprs.RULES or step["op"] not in ops_of_kind("epilogue"):
                raise UnsupportedOpError(f"node {node.name!r} ({node.op}): epilogue step "
                                         f"{step['op']!r} has no CUDA code")


def lower(ctx, node):
    return LOWER[node.op](ctx, node)
