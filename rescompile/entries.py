"""The schedule stage, shared by every backend: which part of the optimized graph each API
call runs.

An entry names the values the caller feeds and the values it fetches; its schedule is the
nodes needed for the fetches, in graph order, stopping at fed values and at values a previous
entry left behind (`backward` reuses what `forward` computed). Backends compile schedules, so
nothing is decided per node at run time. Here too: which values an entry must keep alive
(`kept_values`) and which batch size a run has (`batch_of`); the memory plan of the buffers
a backend allocates is `memory.py`'s, the NumPy interpreter `interpret.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from .autodiff import LEARNING_RATE, SEED
from .ir import BATCH, Graph, Node
from .ops.registry import kind_of
from .passes.constants import parameter_only


@dataclass(frozen=True)
class Entry:
    name: str
    feeds: tuple[str, ...]  # data inputs (and overridden values) the caller supplies
    fetches: tuple[str, ...]  # value names returned
    nodes: tuple[Node, ...]
    after: str | None = None  # entry whose values this one reads

    def computed(self) -> set[str]:
        return set(self.feeds) | {o for n in self.nodes for o in n.outputs}


def schedule(graph: Graph, available: set[str], fetches) -> tuple[Node, ...]:
    needed = {f for f in fetches if f not in available}
    chosen = []
    for node in reversed(graph.nodes):
        if needed.intersection(node.outputs):
            chosen.append(node)
            needed.update(i for i in node.inputs if i not in available)
    missing = needed - {o for n in chosen for o in n.outputs}
    if missing:
        raise ValueError(f"values {sorted(missing)} cannot be computed from the feeds")
    return tuple(reversed(chosen))


def make_entries(graph: Graph, mode: str) -> dict[str, Entry]:
    """Infer mode: `prepare` (parameter-only nodes, run once per variable load) and `forward`.
    Train mode: `forward`, `backward` (after forward), `loss_and_grads`, `train_step`, and
    `train_step` in two halves for data-parallel training: `step_gradients` (the loss, the
    gradients and the batch statistics the moving averages read) and `apply_gradients` (the
    updates, from those fed back, once reduced over the ranks)."""
    variables = {n for n, role in graph.inputs.items() if role != "data"}

    def entry(name, feeds, fetches, after=None, nodes=None):
        available = variables | set(feeds) | (entries[after].computed() if after else set())
        if nodes is None:
            nodes = schedule(graph, available, fetches)
        entries[name] = Entry(name, tuple(feeds), tuple(fetches), nodes, after)

    entries: dict[str, Entry] = {}
    logits = graph.outputs["logits"]
    if mode == "infer":
        constants = parameter_only(graph)
        entry("prepare", [], [o for n in constants for o in n.outputs], nodes=constants)
        entry("forward", ["images"], [logits], after="prepare")
        return entries
    entry("forward", ["images"], [logits])
    if mode == "train":
        grads = [v for k, v in graph.outputs.items() if k.startswith("grad/") and k != "grad/logits"]
        updates = [v for k, v in graph.outputs.items() if k.startswith("new/")]
        loss = graph.outputs["loss"]
        entry("backward", [graph.outputs["grad/logits"], SEED], grads, after="forward")
        entry("loss_and_grads", ["images", "labels", SEED], [loss, logits] + grads)
        entry("train_step", ["images", "labels", SEED, LEARNING_RATE], [loss, logits] + updates)
        stats = batch_statistics(graph)
        trained = [v for k, v in graph.outputs.items()
                   if k.startswith("grad/") and graph.inputs.get(k[5:]) == "param"]
        entry("step_gradients", ["images", "labels", SEED], [loss] + trained + stats)
        entry("apply_gradients", trained + stats + [LEARNING_RATE], updates)
    return entries


def batch_statistics(graph: Graph) -> list[str]:
    """The batch means and variances the moving-average updates read, in graph order."""
    return [node.inputs[-1] for node in graph.nodes
            if kind_of(node.op) == "moving_statistics"]


def kept_values(entries: dict[str, Entry], entry: Entry) -> set[str]:
    """Values that must survive an entry: its fetches and what later entries read."""
    later = [e for e in entries.values() if e.after == entry.name]
    return set(entry.fetches) | {i for e in later for n in e.nodes for i in n.inputs}


def batch_of(graph: Graph, entry: Entry, feeds: dict) -> int | None:
    """The batch size of a run: the leading size of its first fed per-image value, or None
    for an entry fed no images (`backward`, `apply_gradients`: the previous run's)."""
    for name in entry.feeds:
        if name in feeds and graph.value(name).shape[:1] == (BATCH,):
            return int(feeds[name].shape[0])
    return None
