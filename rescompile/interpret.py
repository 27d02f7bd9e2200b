"""The one NumPy interpreter: nodes run in order with each op's reference definition.

The reference backend runs whole entries with it, `check` runs every stage's graph, and the
CPU backend runs its `prepare` entry and its host steps (the loss, the updates, the
collectives) with it, so an op's NumPy meaning is executed by this one loop everywhere.
"""

from __future__ import annotations

from . import ops


def interpret(nodes, env: dict) -> dict:
    """Run `nodes` in order, adding their outputs to `env` (which holds their inputs)."""
    for node in nodes:
        results = ops.get(node.op).run_reference(node.attrs, *[env[i] for i in node.inputs])
        env.update(zip(node.outputs, results))
    return env
