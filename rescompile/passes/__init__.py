"""Compiler passes: a pass is a named function `Graph -> PassResult`; each mode's pipeline is a
plain list (`pipelines.py`) that `run_pipeline` runs, timing, verifying and collecting remarks.
Every pass file opens with its design note: what it does, its preconditions, its numerics."""

from .base import Pass, PassRecord, PassResult, Remark
from .manager import PassError, PipelineRun, run_pipeline
from .pipelines import PIPELINES

__all__ = ["Pass", "PassRecord", "PassResult", "Remark", "PassError", "PipelineRun",
           "run_pipeline", "PIPELINES"]
