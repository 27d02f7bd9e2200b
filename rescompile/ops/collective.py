"""Ops that reduce over the ranks of a data-parallel job (`distributed.world.current()`).

Each rank holds an equal share of the global batch, so a statistic of the global batch is a
mean of the ranks' statistics:

- sync_moments(mean, var) -> (mean, var): the global batch's moments from every rank's, with
  the variance combined as for parallel variance (Chan et al.): the mean over ranks of
  var_r + (mean_r - mean)^2, which has no cancellation, unlike E[x^2] - mean^2.
- rank_mean(dgamma, dbeta) -> (dgamma, dbeta): the mean over the ranks of a batch-norm
  gradient's two sums.

Each op exchanges its operands in one message: a step waits at each exchange for the slowest
rank, so a synchronised batch norm costs one wait forward and one backward, not one per value.
On one process both are the identity.
"""

import numpy as np

from ..distributed.world import current
from .registry import define, require


def sync_moments(mean, var):
    world = current()
    if world.size == 1:
        return mean, var
    means, variances = _gathered(world, [mean, var], "batch-norm means and variances")
    global_mean = means.mean(axis=0)
    spread = means - global_mean
    return global_mean, (variances + spread * spread).mean(axis=0)


def _rank_mean_ref(attrs, dgamma, dbeta):
    world = current()
    if world.size == 1:
        return dgamma, dbeta
    return tuple(g.mean(axis=0) for g in _gathered(world, [dgamma, dbeta],
                                                   "batch-norm gradient sums"))


def _gathered(world, arrays: list, what: str) -> list:
    """Every rank's copy of each of `arrays` (one per-channel vector each), from one
    exchange: [ranks x channels] arrays in the order given."""
    every = world.gather(np.stack(arrays), what)
    return [every[:, i] for i in range(len(arrays))]


def _pair_shape(attrs, first, second):
    require(len(first) == 1 and tuple(second) == tuple(first),
            f"{list(first)} and {list(second)} are not one per-channel pair")
    return [first, second]


define("sync_moments", kind="collective", shape=_pair_shape,
       reference=lambda a, m, v: sync_moments(m, v),
       outputs=("mean", "var"))
define("rank_mean", kind="collective", shape=_pair_shape, reference=_rank_mean_ref,
       outputs=("dgamma", "dbeta"))
