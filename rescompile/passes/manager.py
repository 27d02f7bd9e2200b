"""The pass manager: runs a pipeline (a plain list of passes), times each pass, verifies the
graph after each one when asked, and collects the passes' remarks. When a pass fails, or leaves
a graph the verifier rejects, the error names that pass and the passes that ran before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import GraphError
from ..ir import Graph, verify
from .base import Pass, PassRecord, Remark


class PassError(GraphError):
    """A pass raised or produced an invalid graph."""


@dataclass
class PipelineRun:
    graph: Graph  # the graph after the last pass
    stages: list[tuple[str, Graph]] = field(default_factory=list)  # graph after each pass
    log: list[PassRecord] = field(default_factory=list)
    remarks: list[Remark] = field(default_factory=list)


def run_pipeline(graph: Graph, pipeline: list[Pass], verify_each: bool = False) -> PipelineRun:
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
        run.stages.append((p.name, result.graph))
        run.remarks.extend(Remark(p.name, node, reason) for node, reason in result.remarks)
        run.log.append(PassRecord(p.name, result.changed, seconds, len(graph.nodes),
                                  len(result.graph.nodes), len(result.remarks)))
        graph = run.graph = result.graph
    return run
