"""batch_norm in both modes, its gradient, and the per-channel affine that folding leaves.

Train mode normalises with the batch statistics over N, H, W (biased variance, as
tf.nn.moments) and also outputs them for the moving-average update. With `sync` (data-parallel
training with batch_norm.sync) the statistics are the global batch's (`sync_moments`), and the
gradient's two sums are the mean over the ranks of each rank's (`rank_mean`): each rank's
loss is its own share's mean, so its sums are K times its share of the global ones. Infer mode
reads the moving statistics.

The arithmetic is written once, below, over any arithmetic `m`: values that support + - * /
(constants come in as values of the same kind), and `m.sqrt`, `m.muladd` (a * b + c; fused on
the CPU backend) and `m.let` (an intermediate computed once). The NumPy references pass arrays
(`NUMPY`), the CPU backend LLVM vectors (`cpu/llvm/arith.py`), the CUDA backend source
expressions (`cuda/exprs.py`). It follows tf.nn.batch_normalization: inv = gamma / sqrt(var +
eps), y = x * inv + (beta - mean * inv); the gradient's inv_std = 1 / sqrt(var + eps).
"""

import numpy as np

from .registry import define, require
from . import collective

AXES = (0, 1, 2)


def check_channels(x, *vectors):
    for v in vectors:
        require(len(v) == 1 and v[0] == x[-1], f"per-channel vector {list(v)} does not match "
                                               f"{x[-1]} channels")


def bn_shape(attrs, x, gamma, beta, *stats):
    require(len(x) == 4, "input must be NHWC (rank 4)")
    check_channels(x, gamma, beta, *stats)
    if attrs["training"]:
        require(not stats, "train-mode batch_norm takes (x, gamma, beta)")
        return [x, (x[3],), (x[3],)]
    require(len(stats) == 2, "infer-mode batch_norm takes (x, gamma, beta, mean, variance)")
    return [x]


def batch_moments(x):
    mean = x.mean(axis=AXES)
    var = np.square(x - mean).mean(axis=AXES)
    return mean, var


class _NumpyArithmetic:
    """The arithmetic of the NumPy references: arrays, constants cast to their dtype by the
    caller (`x.dtype.type(eps)`), a * b + c rounded twice."""
    sqrt = staticmethod(np.sqrt)
    muladd = staticmethod(lambda a, b, c: a * b + c)
    let = staticmethod(lambda value: value)


NUMPY = _NumpyArithmetic()


def bn_inv(m, gamma, var, eps):
    """The per-channel scale of batch normalisation: gamma / sqrt(var + eps)."""
    return gamma / m.sqrt(var + eps)


def bn_shift(beta, mean, inv):
    return beta - mean * inv


def bn_affine(m, gamma, beta, mean, var, eps):
    """The per-channel (inv, shift) of batch normalisation: inv = bn_inv, shift = beta -
    mean * inv."""
    inv = m.let(bn_inv(m, gamma, var, eps))
    return inv, bn_shift(beta, mean, inv)


def bn_scaled(m, x, inv, shift):
    """y = x * inv + shift, given bn_affine's (inv, shift)."""
    return m.muladd(x, inv, shift)


def bn_apply(m, x, gamma, beta, mean, var, eps):
    return bn_scaled(m, x, *bn_affine(m, gamma, beta, mean, var, eps))


def bn_inv_std(m, var, eps, one):
    """1 / sqrt(var + eps), `one` being 1 in the values' dtype."""
    return one / m.sqrt(var + eps)


def bn_xhat(x, mean, inv_std):
    return (x - mean) * inv_std


def bn_dx_scale(gamma, inv_std, count):
    """bn_dx's per-channel factor."""
    return gamma * inv_std / count


def bn_dx(dy, xhat, scale, count, dgamma, dbeta):
    """dx of batch normalisation through the batch statistics, given its factor `scale`
    (bn_dx_scale) and its two sums dgamma = sum(dy * xhat) and dbeta = sum(dy) over `count`
    values."""
    return scale * (count * dy - dbeta - xhat * dgamma)


def normalize(x, gamma, beta, mean, var, eps):
    return bn_apply(NUMPY, x, gamma, beta, mean, var, x.dtype.type(eps))


def _bn_ref(attrs, x, gamma, beta, *stats):
    if attrs["training"]:
        mean, var = batch_moments(x)
        if attrs.get("sync"):
            mean, var = collective.sync_moments(mean, var)
        return normalize(x, gamma, beta, mean, var, attrs["epsilon"]), mean, var
    return (normalize(x, gamma, beta, *stats, attrs["epsilon"]),)


def _bn_vjp(g, node, dy, dmean=None, dvar=None):
    if not node.attrs["training"]:
        raise NotImplementedError("gradients flow through train-mode batch_norm only")
    x, gamma, _ = node.inputs
    _, mean, var = node.outputs
    eps = {"epsilon": node.attrs["epsilon"]}
    if not node.attrs.get("sync"):
        return g.emit("batch_norm_grad", [dy, x, gamma, mean, var], eps, "d", n_outputs=3)
    local = g.emit("batch_norm_grad_sums", [dy, x, gamma, mean, var], eps, "d_sums",
                   n_outputs=2)
    dgamma, dbeta = g.emit("rank_mean", local, {}, "d_sums_mean", n_outputs=2)
    dx = g.emit("batch_norm_grad_apply", [dy, x, gamma, mean, var, dgamma, dbeta], eps, "d")
    return [dx, dgamma, dbeta]


def bn_grad_sums_reference(attrs, dy, x, gamma, mean, var):
    """The two sums of batch_norm_grad(dy, x, gamma, mean, var), its first half: (dgamma,
    dbeta). gamma scales dx only; it is an input so that both halves read as the whole."""
    xhat = bn_xhat(x, mean, _inv_std(x, var, attrs))
    return (dy * xhat).sum(axis=AXES), dy.sum(axis=AXES)


def _inv_std(x, var, attrs):
    return bn_inv_std(NUMPY, var, x.dtype.type(attrs["epsilon"]), x.dtype.type(1))


def bn_grad_apply_reference(attrs, dy, x, gamma, mean, var, dgamma, dbeta):
    count = x.dtype.type(x.shape[0] * x.shape[1] * x.shape[2])
    inv_std = _inv_std(x, var, attrs)
    return (bn_dx(dy, bn_xhat(x, mean, inv_std), bn_dx_scale(gamma, inv_std, count), count,
                  dgamma, dbeta),)


def bn_grad_reference(attrs, dy, x, gamma, mean, var):
    """Full gradient through the batch mean and variance."""
    dgamma, dbeta = bn_grad_sums_reference(attrs, dy, x, gamma, mean, var)
    (dx,) = bn_grad_apply_reference(attrs, dy, x, gamma, mean, var, dgamma, dbeta)
    return dx, dgamma, dbeta


def _affine_shape(attrs, x, scale, shift):
    check_channels(x, scale, shift)
    return [x]


GRAD = ("dy", "x", "gamma", "mean", "var")  # batch_norm_grad's inputs, by role
SUMS = ("dgamma", "dbeta")  # its two sums, which are also its two parameter gradients

define("batch_norm", kind="norm", shape=bn_shape, reference=_bn_ref, vjp=_bn_vjp,
       outputs=lambda attrs: ("y", "mean", "var") if attrs["training"] else ("y",))
define("batch_norm_grad", kind="norm_grad", inputs=GRAD,
       shape=lambda a, dy, x, gamma, mean, var: [x, gamma, gamma],
       reference=bn_grad_reference, outputs=("dx",) + SUMS)
define("batch_norm_grad_sums", kind="norm_grad_sums", inputs=GRAD,
       shape=lambda a, dy, x, gamma, mean, var: [gamma, gamma],
       reference=bn_grad_sums_reference, outputs=SUMS)
define("batch_norm_grad_apply", kind="norm_grad", inputs=GRAD + SUMS,
       shape=lambda a, dy, x, gamma, mean, var, dgamma, dbeta: [x],
       reference=bn_grad_apply_reference, outputs=("dx",))
define("affine", kind="epilogue", shape=_affine_shape,
       reference=lambda a, x, scale, shift: (x * scale + shift,))
