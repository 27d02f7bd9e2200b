"""The one NumPy interpreter: nodes run in order with each op's reference definition.

The reference backend runs whole entries with it, `check` runs every stage's graph, and the
CPU backend runs its `prepare` entry and its host steps (the loss, the updates, the
collectives) with it, so an op's NumPy meaning is executed by this one loop everywhere.

With a mixed `precision` (bfloat16: `precision.py`), values are rounded where the CPU kernels
store them: each output stored as bfloat16, each conv weight as the kernels read it, and a
fused op's first output before the op reads it on (`precision.stored`).
"""

from __future__ import annotations

import contextlib

from . import ops


def interpret(nodes, env: dict, precision=None, graph=None) -> dict:
    """Run `nodes` in order, adding their outputs to `env` (which holds their inputs);
    `precision` (with the `graph` the nodes belong to) rounds as a mixed policy stores."""
    mixed = precision is not None and precision.mixed
    with precision.rounding() if mixed else contextlib.nullcontext():
        for node in nodes:
            op = ops.get(node.op)
            args = [env[v] for v in node.inputs]
            if mixed:
                args = [precision.round(a, precision.weights) if precision.reads_rounded(op, i)
                        else a for i, a in enumerate(args)]
            results = op.run_reference(node.attrs, *args)
            if mixed:
                results = [precision.round(r, precision.storage(graph.value(v)))
                           for v, r in zip(node.outputs, results)]
            env.update(zip(node.outputs, results))
    return env
