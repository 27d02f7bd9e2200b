"""Elementwise kernels: one grid-stride loop over a flat index `i`, with operands indexed by
shape (full tensor: `i`; per-channel vector: `i % C`; scalar: `0`) and the arithmetic from
exprs.RULES. Outputs smaller than the loop (per-channel results of fold_bn_weights, the scalar
step of a debiased average) are written by the first `size` iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import exprs
from .launch import Context, Launch, Ref, grid_launch, value
from .pooled import pooled_operands, pooled_read
from .source import indent, kernel_module


@dataclass(frozen=True)
class Operand:
    ref: Ref
    index: str | None  # expression of the loop index `i`; None: the body indexes it itself
    size: int


def index_for(shape: tuple, loop_shape: tuple) -> str:
    """How an operand of `shape` is read in a loop over `loop_shape`."""
    if tuple(shape) == tuple(loop_shape):
        return "i"
    if len(shape) == 0:
        return "0"
    if len(shape) == 1 and loop_shape and shape[0] == loop_shape[-1]:
        return f"i % {shape[0]}"
    raise ValueError(f"operand shape {list(shape)} does not broadcast to {list(loop_shape)}")


def operands(ctx: Context, names, loop_shape) -> list[Operand]:
    return [Operand(value(n), index_for(ctx.shape(n), loop_shape), ctx.size(n)) for n in names]


def loop_source(size: int, ins: list[Operand], outs: list[Operand], compute, dtype: str,
                comment: str, prelude=()) -> str:
    """The kernel: load each input, run `compute(emitter, loads) -> results`, store."""
    e = exprs.Emitter(dtype)
    loads = [f"v{k}" for k in range(len(ins))]
    results = compute(e, loads)
    body = list(prelude) + [f"v{k} = in{k}[{op.index}]" for k, op in enumerate(ins)
                            if op.index is not None] + e.lines
    for k, (out, result) in enumerate(zip(outs, results)):
        store = f"out{k}[i] = {result}"
        body += [store] if out.size == size else [f"if i < {out.size}:", "    " + store]
    params = [f"in{k}" for k in range(len(ins))] + [f"out{k}" for k in range(len(outs))]
    loop = [f"for i in range(cuda.grid(1), {size}, cuda.gridsize(1)):"] + indent(body)
    return kernel_module(params, loop, comment)


def loop_launch(ctx: Context, node_name: str, size: int, ins, outs, compute,
                comment: str, prelude=()) -> Launch:
    source = loop_source(size, ins, outs, compute, ctx.dtype, comment, prelude)
    return grid_launch(ctx, node_name, source, size,
                       tuple(op.ref for op in ins) + tuple(op.ref for op in outs))


def rule_launch(ctx: Context, node, ins=None, outs=None, attrs=None, prelude=()) -> Launch:
    """A node whose every output is elementwise in its largest operand, by its exprs rule; an
    operand an add_pooled step reads is read through its pool."""
    pooled = pooled_operands(node)
    loop_shape = max((ctx.shape(v) for j, v in enumerate(node.inputs + node.outputs)
                      if j not in pooled), key=lambda s: (len(s), s))
    if ins is None:
        ins = operands(ctx, [v for j, v in enumerate(node.inputs) if j not in pooled],
                       loop_shape)
        for j, step in sorted(pooled.items()):
            v = node.inputs[j]
            ins.insert(j, Operand(value(v), None, ctx.size(v)))
            prelude = list(prelude) + pooled_read(f"in{j}", loop_shape, ctx.shape(v),
                                                  step["k"], step["before"], "i",
                                                  f"np.{ctx.dtype}", f"v{j}")
    outs = outs or operands(ctx, node.outputs, loop_shape)
    size = max(op.size for op in outs)
    attrs = node.attrs if attrs is None else attrs
    fn = exprs.RULES[node.op]
    return loop_launch(ctx, node.name, size, ins, outs,
                       lambda e, loads: fn(e, attrs, *loads),
                       f"{node.op} {node.name}", prelude)


def lower_elementwise(ctx: Context, node) -> list[Launch]:
    return [rule_launch(ctx, node)]


def lower_gap_grad(ctx: Context, node) -> list[Launch]:
    """dx[n, h, w, c] = dy[n, c] / (h * w): dy is read at its own (n, c)."""
    n, h, w, c = ctx.shape(node.outputs[0])
    (dy,) = node.inputs
    ins = [Operand(value(dy), f"(i // {h * w * c}) * {c} + i % {c}", ctx.size(dy))]
    return [rule_launch(ctx, node, ins=ins)]
