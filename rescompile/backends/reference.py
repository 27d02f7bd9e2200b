"""The reference backend: interprets a schedule with each op's NumPy definition.

It is the oracle every other backend is tested against, in float64 or float32.
"""

from __future__ import annotations

import numpy as np

from .. import ops


class ReferenceProgram:
    name = "reference"

    def __init__(self, graph, entries):
        self.graph = graph
        self.entries = entries
        self.saved: dict[str, dict] = {}

    def run(self, entry_name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self.entries[entry_name]
        env = dict(self.saved.get(entry.after, {})) if entry.after else {}
        env.update(feeds)
        interpret(entry.nodes, env)
        self.saved[entry_name] = env
        return {name: env[name] for name in entry.fetches}

    def values(self, entry_name: str) -> dict[str, np.ndarray]:
        """Every value the last run of an entry computed (for tests and `check`)."""
        return self.saved[entry_name]


def interpret(nodes, env: dict) -> dict:
    """Run `nodes` in order with each op's NumPy definition, adding their outputs to `env`."""
    for node in nodes:
        results = ops.get(node.op).run_reference(node.attrs, *[env[i] for i in node.inputs])
        env.update(zip(node.outputs, results))
    return env


def compile_program(graph, entries, **_options) -> ReferenceProgram:
    return ReferenceProgram(graph, entries)
