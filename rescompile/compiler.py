"""The compiler's steps, spec to backend program, each a plain function of the previous value.

`lower()` returns the graph after every step by name (build, autodiff in train, then one stage
per pass of the mode's pipeline), which is what `rescompile dump --after` prints, with the pass
log and the passes' remarks; `compile()` hands the last graph to a backend.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .autodiff import training_graph
from .build import Model, Variable, build
from .errors import UsageError
from .ir import Graph
from .passes import PIPELINES, PassRecord, Remark, run_pipeline
from .precision import compute_dtype
from .spec import check_representable, load_spec

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
    pass_log: list[PassRecord]
    remarks: list[Remark]


def lower(spec, mode: str = "infer", dtype: str = "float32", optimize: bool = True,
          verify_each: bool = False, pipeline=None, backend: str | None = None) -> Lowered:
    """`optimize=False` stops after build/autodiff; `pipeline` (a list of passes) replaces the
    mode's; `verify_each` runs the verifier after every pass; `backend` leaves out the passes
    that make ops it has no kernel for (None: the whole pipeline, which the reference
    interpreter and the cpu backend run)."""
    spec = load_spec(spec)
    model = build(spec, mode, dtype)
    check_representable(spec, compute_dtype(dtype))
    stages = [("build", model.graph)]
    graph, variables = model.graph, dict(model.variables)
    if mode == "train":
        graph, variables = training_graph(model, spec)
        stages.append(("autodiff", graph))
    passes = (PIPELINES[mode] if pipeline is None else pipeline) if optimize else []
    supports = backend_module(backend).supports if backend else None
    run = run_pipeline(graph, passes, verify_each, supports, backend or "")
    return Lowered(spec, mode, dtype, run.graph, variables, model, stages + run.stages,
                   run.log, run.remarks)


def backend_options(name: str) -> tuple[str, ...]:
    """The keywords `compile` passes on to the backend (`cache_dir`, `progress`, ...)."""
    parameters = inspect.signature(backend_module(name).compile_program).parameters
    return tuple(p for p in parameters if p not in ("graph", "entries", "dtype"))


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
    raise UsageError(f"backend must be one of {BACKENDS}, got {name!r}")
