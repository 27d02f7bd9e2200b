"""Numerical check of a pipeline: every pass must leave the graph's numbers where they were.

Each stage's graph runs on the reference interpreter with the same seeded inputs: a random
batch, random labels, and random variables whose batch-norm parameters and moving statistics
are far from identity (gamma 0.5..1.5, beta and the mean +-0.5, variance 0.5..2), so a fold with
a wrong epsilon or a swapped scale cannot hide. The first stage (the graph as built, or as
differentiated in train mode) is the baseline; for every later stage we report the largest
change of any public output relative to that output's largest magnitude. A stage past
tolerance is blamed on its pass, and the graphs before and after that pass are compared value
by value (passes keep the names of the values they rewrite) to name the first node that
disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .autodiff import LEARNING_RATE, SEED
from .init import initial_values
from .interpret import interpret
from .ir import Graph
from .precision import compute_dtype

# A bfloat16 model's passes are checked in its compute type, float32: a pass must not change
# the arithmetic, and where bfloat16 rounds moves with every fusion by design (a fused kernel
# stores once where the unfused graph stored after every op).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def random_feeds(lowered, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: data, labels, and non-trivial variables."""
    rng = np.random.default_rng(seed)
    dtype = compute_dtype(lowered.dtype)
    feeds = initial_values(lowered.variables, seed, dtype)
    for name in feeds:
        feeds[name] = _perturbed(rng, name, feeds[name])
    model = lowered.spec.model
    feeds["images"] = rng.standard_normal((batch, *model.input)).astype(dtype)
    feeds["labels"] = np.eye(model.num_classes, dtype=dtype)[rng.integers(0, model.num_classes,
                                                                         batch)]
    feeds[SEED] = np.asarray(1, dtype)
    feeds[LEARNING_RATE] = np.asarray(0.1, dtype)
    return feeds


def _perturbed(rng, name: str, value: np.ndarray) -> np.ndarray:
    """BN parameters and statistics away from identity; momentum slots non-zero."""
    leaf = name.rsplit("/", 1)[-1]
    draws = {"gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.uniform(-.5, .5, s),
             "moving_mean": lambda s: rng.uniform(-.5, .5, s),
             "moving_variance": lambda s: rng.uniform(0.5, 2.0, s),
             "Momentum": lambda s: rng.normal(0, 0.01, s), "biases": lambda s: rng.normal(0, .1, s)}
    if leaf not in draws:
        return value
    return draws[leaf](value.shape).astype(value.dtype)


def evaluate(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of the graph, computed node by node with the ops' references."""
    return interpret(graph.nodes, {name: feeds[name] for name in graph.inputs})


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |a| (to 1 when a is all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-30)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


@dataclass
class StageCheck:
    stage: str
    change: float  # largest relative change of any public output vs the baseline
    worst_output: str


@dataclass
class CheckReport:
    tolerance: float
    stages: list[StageCheck]
    failed_pass: str | None = None
    first_bad_node: str | None = None  # "node (op): value, relative change"

    @property
    def ok(self) -> bool:
        return self.failed_pass is None


def check_stages(lowered, batch: int = 2, seed: int = 0,
                 tolerance: float | None = None) -> CheckReport:
    """Run every stage of `lowered` (from its baseline on) and blame the first bad pass."""
    tolerance = TOLERANCE[compute_dtype(lowered.dtype)] if tolerance is None else tolerance
    feeds = random_feeds(lowered, batch, seed)
    first = 1 if lowered.mode == "train" else 0  # train's baseline is the autodiff graph
    stages = lowered.stages[first:]
    envs = [evaluate(graph, feeds) for _, graph in stages]
    base_graph, base = stages[0][1], envs[0]
    report = CheckReport(tolerance, [])
    for (name, graph), env in zip(stages, envs):
        changes = {key: relative_change(base[base_graph.outputs[key]], env[value])
                   for key, value in graph.outputs.items()}
        worst = max(changes, key=changes.get)
        report.stages.append(StageCheck(name, changes[worst], worst))
        if changes[worst] > tolerance and report.ok:
            i = len(report.stages) - 1
            report.failed_pass = name
            report.first_bad_node = first_disagreement(stages[i - 1][1], envs[i - 1], graph, env,
                                                       tolerance)
    return report


def first_disagreement(before: Graph, env_before, after: Graph, env_after,
                       tolerance: float) -> str | None:
    """The first node of `after` one of whose values, present in both graphs, disagrees."""
    for node in after.nodes:
        for value in node.outputs:
            if value not in env_before or before.values.get(value) != after.values[value]:
                continue
            change = relative_change(env_before[value], env_after[value])
            if change > tolerance:
                return f"{node.name} ({node.op}): value {value} moved by {change:.3g}"
    return None
