"""Before a data-parallel job starts: every rank must run rank 0's configuration.

Ranks started with different flags would hang in an exchange (different `--steps`: one rank
waits for a step the others never take) or silently train a wrong model (different learning
rates). So rank 0's configuration, every field of `TrainConfig` (taken from the dataclass,
so a new flag is covered without being listed here) and its spec, is broadcast, and a rank
that differs stops the job naming the first flag or spec field that differs.
"""

from __future__ import annotations

import json
from dataclasses import fields

from ..errors import SpecError, UsageError
from .checkpoints import first_difference
from .config import TrainConfig


def settings(config: TrainConfig) -> dict:
    """The configuration as plain values: each field by name, the spec as its dict."""
    return {f.name: config.spec.to_dict() if f.name == "spec" else getattr(config, f.name)
            for f in fields(config)}


def check_agreement(config: TrainConfig, world) -> None:
    """Raise on a rank whose configuration differs from rank 0's: a SpecError naming the
    spec field, or a UsageError naming the flag."""
    if world.size == 1:
        return
    mine = settings(config)
    first = world.broadcast(mine if world.rank == 0 else None)
    found = first_difference(first["spec"], mine["spec"])
    if found is not None:
        name, theirs, ours = found
        raise SpecError(f"{name}: {ours} in this rank's spec, {theirs} in rank 0's; every rank "
                        f"must train the same spec")
    for name, value in mine.items():
        if value != first[name]:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} {json.dumps(value)} differs from rank 0's "
                             f"{json.dumps(first[name])}; every rank must be started with the "
                             f"same flags")
