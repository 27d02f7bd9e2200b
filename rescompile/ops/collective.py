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

The combination is written once (`COMBINE`), over `over_ranks(term)`: the mean over the ranks
of term(r), its terms added in rank order and the sum divided by the number of ranks (what
NumPy's `mean(axis=0)` of a [ranks, channels] array computes). The references pass NumPy rows,
the CPU backend's exchange kernel a loop over the ranks in IR (`cpu/llvm/exchange.py`).
"""

import functools
import operator

import numpy as np

from ..distributed.world import current
from .registry import define, require


def rank_spread(var_r, mean_r, mean):
    """One rank's term of the global variance: its variance plus its mean's squared distance
    from the global mean."""
    spread = mean_r - mean
    return var_r + spread * spread


def combine_moments(over_ranks, means, variances):
    """The global (mean, var) from the ranks' `means(r)` and `variances(r)`."""
    mean = over_ranks(means)
    return mean, over_ranks(lambda r: rank_spread(variances(r), means(r), mean))


def combine_means(over_ranks, first, second):
    return over_ranks(first), over_ranks(second)


COMBINE = {"sync_moments": combine_moments, "rank_mean": combine_means}


def _exchanged(op: str, first, second, what: str):
    world = current()
    if world.size == 1:
        return first, second
    every = world.gather(np.stack([first, second]), what)  # [ranks, 2, channels]

    def over_ranks(term):
        return functools.reduce(operator.add, map(term, range(world.size))) / world.size
    return COMBINE[op](over_ranks, lambda r: every[r, 0], lambda r: every[r, 1])


def sync_moments(mean, var):
    return _exchanged("sync_moments", mean, var, "batch-norm means and variances")


def _pair_shape(attrs, first, second):
    require(len(first) == 1 and tuple(second) == tuple(first),
            f"{list(first)} and {list(second)} are not one per-channel pair")
    return [first, second]


define("sync_moments", kind="collective", shape=_pair_shape,
       reference=lambda a, m, v: sync_moments(m, v),
       outputs=("mean", "var"))
define("rank_mean", kind="collective", shape=_pair_shape,
       reference=lambda a, g, b: _exchanged("rank_mean", g, b, "batch-norm gradient sums"),
       outputs=("dgamma", "dbeta"))
