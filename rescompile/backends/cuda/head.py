"""Softmax cross-entropy and its gradient (ops/head.py), one thread per row of logits.

The loss is a per-row value then a mean: the rows go to float64 partials and reduce.py's
ordered second level averages them, so the loss is deterministic too.
"""

from __future__ import annotations

from .launch import Context, Launch, grid_launch, value
from .reduce import finalize_launch
from .source import indent, kernel_module


def _row_logsumexp(logits: str, classes: int) -> list[str]:
    """log_softmax's shift and normaliser of row `row` of `logits`, in float64."""
    at = f"np.float64({logits}[row * {classes} + j])"
    return [f"mx = np.float64({logits}[row * {classes}])",
            f"for j in range({classes}):", f"    mx = max(mx, {at})",
            "tot = np.float64(0)", f"for j in range({classes}):", f"    tot += math.exp({at} - mx)",
            "lse = mx + math.log(tot)"]


def lower_xent(ctx: Context, node) -> list[Launch]:
    """ops/head.py _xent_ref: -(labels * log_softmax(logits)).sum(axis=1).mean()."""
    logits, labels = node.inputs
    rows, classes = ctx.shape(logits)
    part = ctx.temp(node, "rows", rows, "float64")
    body = _row_logsumexp("in0", classes) + [
        "acc = np.float64(0)", f"for j in range({classes}):",
        f"    acc -= np.float64(in1[row * {classes} + j]) * "
        f"(np.float64(in0[row * {classes} + j]) - lse)", "part[row] = acc"]
    loop = [f"for row in range(cuda.grid(1), {rows}, cuda.gridsize(1)):"] + indent(body)
    source = kernel_module(["in0", "in1", "part"], loop, f"{node.op} {node.name} (rows)")
    first = grid_launch(ctx, node.name, source, rows, (value(logits), value(labels), part))
    mean = f"out0[0] = np.{ctx.dtype}(s0 / {rows})"
    return [first, finalize_launch(ctx, node, 1, 1, rows, part, [], [value(node.outputs[0])],
                                   [mean])]


def lower_xent_grad(ctx: Context, node) -> list[Launch]:
    """ops/head.py _xent_grad_ref: (softmax * sum(labels) - labels) * dloss / N."""
    dloss, logits, labels = node.inputs
    rows, classes = ctx.shape(logits)
    dt = f"np.{ctx.dtype}"
    body = _row_logsumexp("in1", classes) + [
        f"labsum = {dt}(0)", f"for j in range({classes}):",
        f"    labsum += in2[row * {classes} + j]",
        f"scale = in0[0] / {dt}({rows})", f"for j in range({classes}):",
        f"    prob = {dt}(math.exp(np.float64(in1[row * {classes} + j]) - lse))",
        f"    out0[row * {classes} + j] = (prob * labsum - in2[row * {classes} + j]) * scale"]
    loop = [f"for row in range(cuda.grid(1), {rows}, cuda.gridsize(1)):"] + indent(body)
    source = kernel_module(["in0", "in1", "in2", "out0"], loop, f"{node.op} {node.name}")
    return [grid_launch(ctx, node.name, source, rows,
                         tuple(value(v) for v in node.inputs) + (value(node.outputs[0]),))]
