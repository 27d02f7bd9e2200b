"""The seed's shortcut read through its pool: source lines that average an NHWC tensor over
k x k blocks and zero-pad its channels, at one flat output index. Standalone avg_pool and
pad_channels (pool.py), fused epilogues (gemm.py) and elementwise kernels (elementwise.py)
read an add_pooled operand with these same lines."""

from __future__ import annotations


def pooled_read(array: str, out_shape, in_shape, k: int, before: int, flat: str, dt: str,
                name: str) -> list[str]:
    """Lines setting `name` to element `flat` of `array` (NHWC `in_shape`) average-pooled over
    k x k blocks and zero-padded by `before` channels to `out_shape`: the taps summed in
    row-major order, then divided (ops/pool.py avg_pool_reference)."""
    (_, oh, ow, c), (_, h, w, cin) = out_shape, in_shape
    return [f"{name}_c = {flat} % {c} - {before}", f"{name} = {dt}(0)",
            f"if {name}_c >= 0 and {name}_c < {cin}:",
            f"    {name}_p = {flat} // {c}",
            f"    {name}_b = {name}_p // {oh * ow}",
            f"    {name}_h = ({name}_p // {ow}) % {oh} * {k}",
            f"    {name}_w = {name}_p % {ow} * {k}",
            f"    for ti in range({k}):", f"        for tj in range({k}):",
            f"            {name} += {array}[(({name}_b * {h} + {name}_h + ti) * {w} + "
            f"{name}_w + tj) * {cin} + {name}_c]",
            f"    {name} = {name} / {dt}({k * k})"]


def pooled_operands(node) -> dict[int, dict]:
    """Input index -> the attributes of the add_pooled step that reads it through its pool."""
    steps = list(node.attrs.get("epilogue", ())) + list(node.attrs.get("out2", ()))
    if node.op == "add_pooled":
        steps = [{"op": node.op, "args": [1], **node.attrs}]
    return {step["args"][0]: step for step in steps if step["op"] == "add_pooled"}
