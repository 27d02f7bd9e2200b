"""Accuracy and confusion matrix of an inference executable on a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import eval_batches

BATCH = 256


@dataclass
class Evaluation:
    confusion: np.ndarray  # [true class, predicted class] -> count

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def evaluate(exe, images, labels, num_classes: int, world=None,
             normalize=None) -> Evaluation:
    """Held-out pixels, normalised as the data pipeline's eval transform does (`normalize`,
    default the seed's per-image standardization). In a data-parallel job each rank takes a
    contiguous share and the counts are summed."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    if world is not None and world.size > 1:
        share = -(-len(labels) // world.size)
        mine = slice(world.rank * share, (world.rank + 1) * share)
        images, labels = images[mine], labels[mine]
    for batch, truth in eval_batches(images, labels, BATCH, normalize):
        predicted = np.argmax(exe.forward(batch), axis=1)
        np.add.at(confusion, (truth, predicted), 1)
    if world is not None and world.size > 1:
        confusion = world.gather(confusion, "evaluation counts").sum(axis=0)
    return Evaluation(confusion)


def confusion_table(confusion: np.ndarray, names=None) -> str:
    """Rows are true classes (with their names, if given), columns predicted ones."""
    width = max(len(str(confusion.max())), len(str(len(confusion) - 1))) + 1
    labels = [f"{k} {names[k]}" if names else str(k) for k in range(len(confusion))]
    first = max(10, *(len(label) for label in labels))

    def row(label, values) -> str:
        return f"{label:<{first}}" + "".join(f"{v:>{width}}" for v in values)

    header = row("true\\pred", range(len(confusion)))
    return "\n".join([header] + [row(labels[k], counts) for k, counts in enumerate(confusion)])
