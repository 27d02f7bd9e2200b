"""The reference backend: interprets a schedule with each op's NumPy definition.

It is the oracle every other backend is tested against, in float64 or float32, and in
bfloat16: float32 arithmetic rounded to bfloat16 wherever the CPU kernels store a value as
bfloat16 (`precision.py`; the feeds too, as the kernels read them).
"""

from __future__ import annotations

import math

import numpy as np

from ..entries import batch_of
from ..interpret import interpret
from ..ops import OPS
from ..precision import Precision
from ..resources import check_fits


class ReferenceProgram:
    name = "reference"

    def __init__(self, graph, entries, dtype: str):
        self.graph = graph
        self.entries = entries
        self.precision = Precision(dtype)
        self.itemsize = np.dtype(self.precision.compute).itemsize
        self.saved: dict[str, dict] = {}

    def run(self, entry_name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self.entries[entry_name]
        check_fits(self._value_bytes(entry, feeds), f"the reference backend's values of "
                                                    f"{entry_name!r}")
        env = dict(self.saved.get(entry.after, {})) if entry.after else {}
        env.update(feeds)
        if self.precision.mixed:  # as the kernels read what is fed
            env.update({name: self.precision.round(value, self.precision.storage(
                self.graph.value(name))) for name, value in feeds.items()
                if name in self.graph.values})
        interpret(entry.nodes, env, self.precision, self.graph)
        self.saved[entry_name] = env
        return {name: env[name] for name in entry.fetches}

    def _value_bytes(self, entry, feeds) -> int:
        """The interpreter keeps every value of an entry: their bytes at the feeds' batch."""
        batch = batch_of(self.graph, entry, feeds) or 1
        return sum(math.prod(self.graph.value(v).concrete_shape(batch)) * self.itemsize
                   for node in entry.nodes for v in node.outputs)

    def values(self, entry_name: str) -> dict[str, np.ndarray]:
        """Every value the last run of an entry computed (for tests and `check`)."""
        return self.saved[entry_name]


def supports(op: str) -> bool:
    """The reference interpreter runs every op: each has its NumPy definition."""
    return op in OPS


def compile_program(graph, entries, dtype: str) -> ReferenceProgram:
    return ReferenceProgram(graph, entries, dtype)
