"""What a checkpoint keeps of the data it was trained on, so that `eval` and `predict` prepare
images as training did and can name the classes: the class names (None for data sets without
any), the normalisation with its statistics, and the fraction a seeded split held out.

The record is read back from a file anyone may have made, so every field is checked, and
class names only ever get printed (`classes.py`). A checkpoint without a record (one written
before records, or by `Executable.save`) gets the default: no names, per-image standardisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import CheckpointError
from .classes import names_problem
from .normalize import KINDS, Normalization
from .split import DEFAULT_VAL_FRACTION

FIELDS = ("classes", "normalize", "mean", "std", "val_fraction")


@dataclass(frozen=True)
class DataRecord:
    classes: tuple[str, ...] | None = None
    normalization: Normalization = field(default_factory=Normalization)
    val_fraction: float = DEFAULT_VAL_FRACTION

    def to_dict(self) -> dict:
        n = self.normalization
        return {"classes": None if self.classes is None else list(self.classes),
                "normalize": n.kind, "mean": list(n.mean), "std": list(n.std),
                "val_fraction": self.val_fraction}

    @classmethod
    def from_dict(cls, path, value, num_classes: int, channels: int) -> DataRecord:
        """The record of the checkpoint at `path` for a model of `num_classes` classes and
        `channels` input channels; CheckpointError naming the field if anything is off."""
        def refuse(what: str):
            return CheckpointError(f"{path}: the data record's {what}")

        if not isinstance(value, dict) or sorted(value) != sorted(FIELDS):
            raise refuse(f"fields must be exactly {', '.join(FIELDS)}")
        classes = value["classes"]
        if classes is not None:
            problem = names_problem(classes)
            if problem:
                raise refuse(f"classes: {problem}")
            if len(classes) != num_classes:
                raise refuse(f"classes: {len(classes)} names for a model of {num_classes}")
        kind = value["normalize"]
        if kind not in KINDS:
            raise refuse(f"normalize must be one of {', '.join(KINDS)}")
        size = channels if kind == "channel" else 0
        mean, std = _numbers(value["mean"], size), _numbers(value["std"], size)
        if mean is None or std is None or not all(s > 0 for s in std):
            raise refuse(f"mean and std must be {size} finite numbers each, std > 0")
        fraction = value["val_fraction"]
        if type(fraction) is not float or not 0 < fraction < 1:
            raise refuse("val_fraction must be a number between 0 and 1")
        return cls(None if classes is None else tuple(classes),
                   Normalization(kind, mean, std), fraction)


def _numbers(value, size: int) -> tuple[float, ...] | None:
    if not isinstance(value, list) or len(value) != size:
        return None
    if not all(type(v) is float and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)
