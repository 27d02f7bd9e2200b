"""The compiler's steps, spec to backend program, each a plain function of the previous value.

`stages()` returns the graph after every step by name, which is what `rescompile dump --after`
prints; `compile()` runs the same steps and hands the last graph to a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from .autodiff import training_graph
from .build import Model, Variable, build
from .ir import Graph
from .spec import load_spec

BACKENDS = ("reference", "cpu", "cuda")


@dataclass
class Lowered:
    """A spec lowered to an optimised graph, plus what the runtime needs beside it."""
    spec: object
    mode: str
    dtype: str
    graph: Graph
    variables: dict[str, Variable]
    model: Model
    stages: list[tuple[str, Graph]]


def lower(spec, mode: str = "infer", dtype: str = "float32", optimize: bool = True,
          verify_each: bool = False) -> Lowered:
    spec = load_spec(spec)
    model = build(spec, mode, dtype)
    stages = [("build", model.graph)]
    graph, variables = model.graph, dict(model.variables)
    if mode == "train":
        graph, variables = training_graph(model, spec)
        stages.append(("autodiff", graph))
    return Lowered(spec, mode, dtype, graph, variables, model, stages)


def backend_module(name: str):
    if name == "reference":
        from .backends import reference
        return reference
    if name == "cpu":
        from .backends import cpu
        return cpu
    if name == "cuda":
        from .backends import cuda
        return cuda
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
