"""Deterministic two-level reductions: batch-norm statistics and gradients, sum_rows,
global average pooling, weight decay.

Design note
-----------
A reduction sums an element expression over R rows for each of C columns. Level one: thread
(p, col) sums rows [p*RC, (p+1)*RC) of its column in a fixed order into a float64 partial
`part[acc][p, col]` (neighbouring threads take neighbouring columns, so NHWC reads coalesce).
Level two: one thread per column adds its partials in order of p and runs the finalize lines
(divide by the count, cast, write outputs). No atomics and a fixed order: the same inputs give
bit-identical results on every run. Partials are float64 so the sum order barely matters for
accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import exprs
from .elementwise import Operand, operands, rule_launch
from .launch import Context, Launch, Ref, cdiv, grid_launch, value
from .source import indent, kernel_module


@dataclass(frozen=True)
class Reduction:
    rows: int
    cols: int
    element: tuple[str, ...]  # statements reading in{j} at (r, col)
    terms: tuple[str, ...]    # one float64 expression per accumulator


def split_rows(rows: int, cols: int, target) -> int:
    """Rows per level-one thread: at least reduce_rows, enough threads to fill the device."""
    return max(target.reduce_rows, cdiv(rows, max(1, target.reduce_threads // cols)))


def partial_launch(ctx: Context, node, red: Reduction, ins: list[Ref], part: Ref, base: int,
                   total_parts: int) -> Launch:
    chunk = split_rows(red.rows, red.cols, ctx.target)
    parts = cdiv(red.rows, chunk)
    body = [f"p = t // {red.cols}", f"col = t % {red.cols}"]
    body += [f"s{a} = np.float64(0)" for a in range(len(red.terms))]
    body += [f"for r in range(p * {chunk}, min({red.rows}, p * {chunk} + {chunk})):"]
    body += indent(list(red.element) + [f"s{a} += {term}" for a, term in enumerate(red.terms)])
    body += [f"part[{a * total_parts * red.cols + base * red.cols} + t] = s{a}"
             for a in range(len(red.terms))]
    loop = [f"for t in range(cuda.grid(1), {parts * red.cols}, cuda.gridsize(1)):"]
    params = [f"in{j}" for j in range(len(ins))] + ["part"]
    source = kernel_module(params, loop + indent(body), f"{node.op} {node.name} (partial sums)")
    return grid_launch(ctx, node.name, source, parts * red.cols, tuple(ins) + (part,))


def parts_of(red: Reduction, target) -> int:
    return cdiv(red.rows, split_rows(red.rows, red.cols, target))


def finalize_launch(ctx: Context, node, cols: int, accs: int, total_parts: int, part: Ref,
                    ins: list[Ref], outs: list[Ref], lines: list[str]) -> Launch:
    """Sum each column's partials in order (s0, s1, ...), then run `lines`."""
    body = [f"s{a} = np.float64(0)" for a in range(accs)]
    body += [f"for p in range({total_parts}):"]
    body += [f"    s{a} += part[{a * total_parts * cols} + p * {cols} + col]"
             for a in range(accs)]
    loop = [f"for col in range(cuda.grid(1), {cols}, cuda.gridsize(1)):"]
    params = ["part"] + [f"in{j}" for j in range(len(ins))] + \
             [f"out{k}" for k in range(len(outs))]
    source = kernel_module(params, loop + indent(body + lines), f"{node.op} {node.name} (total)")
    return grid_launch(ctx, node.name, source, cols, (part,) + tuple(ins) + tuple(outs))


def column_sums(ctx: Context, node, tag: str, red: Reduction, ins: list[Ref], outs: list[Ref],
                lines: list[str]) -> list[Launch]:
    parts = parts_of(red, ctx.target)
    part = ctx.temp(node, tag, len(red.terms) * parts * red.cols, "float64")
    return [partial_launch(ctx, node, red, ins, part, 0, parts),
            finalize_launch(ctx, node, red.cols, len(red.terms), parts, part, ins, outs, lines)]


# -- lowerings ---------------------------------------------------------------------------------
def moments(ctx: Context, node, x: str, mean: str, var: str) -> list[Launch]:
    """ops/norm.py batch_moments: the mean, then the biased variance around it."""
    n, h, w, c = ctx.shape(x)
    rows, dt = n * h * w, f"np.{ctx.dtype}"
    mean_sum = Reduction(rows, c, (), (f"np.float64(in0[r * {c} + col])",))
    var_sum = Reduction(rows, c, (f"d = np.float64(in0[r * {c} + col]) - np.float64(in1[col])",),
                        ("d * d",))
    average = [f"out0[col] = {dt}(s0 / {rows})"]
    return (column_sums(ctx, node, "mean", mean_sum, [value(x)], [value(mean)], average) +
            column_sums(ctx, node, "var", var_sum, [value(x), value(mean)], [value(var)],
                        average))


def lower_batch_norm(ctx: Context, node) -> list[Launch]:
    """Train mode: the moments, then the normalize; infer mode is the normalize alone."""
    if not node.attrs["training"]:
        return [rule_launch(ctx, node)]
    x, gamma, beta = node.inputs
    y, mean, var = node.outputs
    return moments(ctx, node, x, mean, var) + [
        rule_launch(ctx, node, ins=_operands(ctx, [x, gamma, beta, mean, var], x),
                    outs=_operands(ctx, [y], x))]


def lower_batch_moments(ctx: Context, node) -> list[Launch]:
    return moments(ctx, node, node.inputs[0], *node.outputs)


def lower_bn_grad(ctx: Context, node) -> list[Launch]:
    """ops/norm.py bn_grad_reference (and ops/fused_train.py's version through relu_grad of the
    recomputed normalize): dbeta = sum(dy), dgamma = sum(dy * xhat), then dx per element."""
    fused = node.op == "batch_norm_relu_grad"
    names = list(node.inputs)  # dy, x, gamma, mean, var  or  dr, x, gamma, beta, mean, var
    dx, dgamma, dbeta = node.outputs
    n, h, w, c = ctx.shape(names[1])
    rows, dt = n * h * w, f"np.{ctx.dtype}"
    e = exprs.Emitter(ctx.dtype, prefix="q")
    loads = [f"in{j}[r * {c} + col]" if ctx.shape(v) == ctx.shape(names[1]) else f"in{j}[col]"
             for j, v in enumerate(names)]
    dy = exprs.bn_relu_dy(e, node.attrs, *loads) if fused else loads[0]
    mean, var = loads[-2:]
    _, xhat = exprs.bn_xhat(e, node.attrs, loads[1], mean, var)
    red = Reduction(rows, c, tuple(e.lines),
                    (f"np.float64({dy})", f"np.float64({dy}) * np.float64({xhat})"))
    sums = column_sums(ctx, node, "sums", red, [value(v) for v in names],
                       [value(dgamma), value(dbeta)],
                       [f"out0[col] = {dt}(s1)", f"out1[col] = {dt}(s0)"])
    attrs = dict(node.attrs, count=rows)
    return sums + [rule_launch(ctx, node, ins=_operands(ctx, names + [dgamma, dbeta], names[1]),
                               outs=_operands(ctx, [dx], names[1]), attrs=attrs)]


def lower_stats(lower):
    """A fused op with `stats`: its kernel, then the moments of its first output."""
    def lowered(ctx: Context, node) -> list[Launch]:
        if not node.attrs.get("stats"):
            return lower(ctx, node)
        main = node.outputs[:-2]
        launches = lower(ctx, node.replace(outputs=main))
        return launches + moments(ctx, node, main[0], *node.outputs[-2:])
    return lowered


def _operands(ctx, names, like) -> list[Operand]:
    return operands(ctx, names, ctx.shape(like))


def lower_sum_rows(ctx: Context, node) -> list[Launch]:
    rows, cols = ctx.shape(node.inputs[0])
    red = Reduction(rows, cols, (), (f"np.float64(in0[r * {cols} + col])",))
    return column_sums(ctx, node, "sum", red, [value(node.inputs[0])], [value(node.outputs[0])],
                       [f"out0[col] = np.{ctx.dtype}(s0)"])


def lower_global_avg_pool(ctx: Context, node) -> list[Launch]:
    """Column (b, c) of the output sums the H*W pixels of image b, channel c."""
    n, h, w, c = ctx.shape(node.inputs[0])
    term = f"np.float64(in0[(col // {c}) * {h * w * c} + r * {c} + col % {c}])"
    red = Reduction(h * w, n * c, (), (term,))
    return column_sums(ctx, node, "sum", red, [value(node.inputs[0])], [value(node.outputs[0])],
                       [f"out0[col] = np.{ctx.dtype}(s0 / {h * w})"])


def lower_l2_penalty(ctx: Context, node) -> list[Launch]:
    """ops/update.py _l2_ref: level one per weight tensor into one shared partial buffer, level
    two sums them all: scale * sum(w**2) / 2."""
    reds = [Reduction(ctx.size(w), 1, (), ("np.float64(in0[r]) * np.float64(in0[r])",))
            for w in node.inputs]
    counts = [parts_of(red, ctx.target) for red in reds]
    total = sum(counts)
    part = ctx.temp(node, "sumsq", total, "float64")
    bases = [sum(counts[:i]) for i in range(len(counts))]
    launches = [partial_launch(ctx, node, red, [value(w)], part, base, total)
                for red, w, base in zip(reds, node.inputs, bases)]
    dt = f"np.{ctx.dtype}"
    line = f"out0[0] = {dt}({float(node.attrs['scale'])!r}) * {dt}(s0 / 2)"
    return launches + [finalize_launch(ctx, node, 1, 1, total, part, [],
                                       [value(node.outputs[0])], [line])]
