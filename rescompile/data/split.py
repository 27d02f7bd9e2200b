"""A held-out split for data that come without one: within each class, a seeded shuffle, and
`fraction` of it held out (rounded half up; at least one image of a class of two or more,
never its last one). The seed is fixed, not the run's, so that every run, and `eval` after
it, hold out the same images."""

import math

import numpy as np

from .errors import DataError

SPLIT_SEED = 0
DEFAULT_VAL_FRACTION = 0.1


def split(labels: np.ndarray, fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), each in ascending order."""
    train, held = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = np.random.default_rng([SPLIT_SEED, int(label)]).permutation(members)
        count = min(len(members) - 1, max(1, math.floor(len(members) * fraction + 0.5)))
        held.append(members[:count])
        train.append(members[count:])
    held_out = np.sort(np.concatenate(held))
    if not len(held_out):
        raise DataError(f"{what}: too few images to hold out a validation set (every class "
                        f"has one image)")
    return np.sort(np.concatenate(train)), held_out
