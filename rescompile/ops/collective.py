"""Ops that reduce over the ranks of a data-parallel job (`distributed.world.current()`).

Each rank holds an equal share of the global batch, so a statistic of the global batch is a
mean of the ranks' statistics:

- sync_moments(mean, var) -> (mean, var): the global batch's moments from every rank's, with
  the variance combined as for parallel variance (Chan et al.): the mean over ranks of
  var_r + (mean_r - mean)^2, which has no cancellation, unlike E[x^2] - mean^2.
- rank_mean(x) -> x: the mean over the ranks (of a batch-norm gradient's sums).

On one process both are the identity.
"""

from ..distributed.world import current
from .registry import define, require


def sync_moments(mean, var):
    world = current()
    if world.size == 1:
        return mean, var
    means = world.gather(mean, "batch-norm means")
    variances = world.gather(var, "batch-norm variances")
    global_mean = means.mean(axis=0)
    spread = means - global_mean
    return global_mean, (variances + spread * spread).mean(axis=0)


def _rank_mean_ref(attrs, x):
    world = current()
    return (x if world.size == 1 else world.gather(x, "batch-norm gradient sums").mean(axis=0),)


def _moments_shape(attrs, mean, var):
    require(len(mean) == 1 and tuple(var) == tuple(mean),
            f"moments {list(mean)} and {list(var)} are not one per-channel pair")
    return [mean, var]


define("sync_moments", kind="collective", shape=_moments_shape,
       reference=lambda a, m, v: sync_moments(m, v),
       outputs=("mean", "var"))
define("rank_mean", kind="collective", shape=lambda a, x: [x], reference=_rank_mean_ref)
