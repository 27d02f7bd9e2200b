"""The pass manager: runs a pipeline (a plain list of passes), times each pass, verifies the
graph after each one when asked, and collects the passes' remarks. When a pass fails, or leaves
a graph the verifier rejects, the error names that pass and the passes that ran before it.

A pipeline runs for a backend: a pass whose graph would hold an op the backend has no kernel
for (a fused op it does not implement) is skipped, and a remark says which op, so a backend
only ever receives what it can run and a fusion it cannot take is never silent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import GraphError
from ..ir import Graph, verify
from .base import Pass, PassRecord, PassResult, Remark


class PassError(GraphError):
    """A pass raised or produced an invalid graph."""


@dataclass
class PipelineRun:
    graph: Graph  # the graph after the last pass
    stages: list[tuple[str, Graph]] = field(default_factory=list)  # graph after each pass
    log: list[PassRecord] = field(default_factory=list)
    remarks: list[Remark] = field(default_factory=list)


def run_pipeline(graph: Graph, pipeline: list[Pass], verify_each: bool = False,
                 supports=None, backend: str = "") -> PipelineRun:
    """`supports(op)`: whether `backend` has a kernel for op (None: every op)."""
    run = PipelineRun(graph)
    for i, p in enumerate(pipeline):
        before = [q.name for q in pipeline[:i]]
        start = time.perf_counter()
        try:
            result = p.run(graph)
            if verify_each:
                verify(result.graph)
        except Exception as exc:
            ran = ", ".join(before) or "none"
            raise PassError(f"pass {p.name!r} failed (passes before it: {ran}): {exc}") from exc
        seconds = time.perf_counter() - start
        missing = _unsupported(result.graph, supports) - _unsupported(graph, supports)
        if missing:
            run.remarks.append(Remark(p.name, "(pipeline)", f"skipped: backend {backend!r} "
                                      f"has no kernel for {', '.join(sorted(missing))}"))
            result = PassResult(graph, False)
        run.stages.append((p.name, result.graph))
        run.remarks.extend(Remark(p.name, node, reason) for node, reason in result.remarks)
        run.log.append(PassRecord(p.name, result.changed, seconds, len(graph.nodes),
                                  len(result.graph.nodes), len(result.remarks)))
        graph = run.graph = result.graph
    return run


def _unsupported(graph: Graph, supports) -> set[str]:
    return {n.op for n in graph.nodes if supports is not None and not supports(n.op)}
