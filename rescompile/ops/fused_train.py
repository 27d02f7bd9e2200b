"""Ops that only the training fusion passes create. A train-mode `batch_norm` is split into its
two halves, the reduction and the normalisation, so each half can join a neighbouring kernel;
each half runs exactly the arithmetic `batch_norm` runs, so splitting changes no bits.

- batch_moments(x) -> (mean, var): the batch statistics over N, H, W (biased variance).
- batch_normalize(x, gamma, beta, mean, var): normalise with given statistics; an epilogue op.
- batch_norm_relu_grad(dr, x, gamma, beta, mean, var): `batch_norm_grad` of
  `relu_grad(dr, batch_normalize(x, ...))`. It recomputes the normalised value from the saved
  conv output instead of keeping it alive until the backward pass.
"""

from .elementwise import leaky_relu_grad
from .norm import bn_grad_reference, bn_shape, check_channels, batch_moments, normalize
from .registry import define


def _normalize_shape(attrs, x, gamma, beta, mean, var):
    check_channels(x, gamma, beta, mean, var)
    return [x]


def _bn_relu_grad_ref(attrs, dr, x, gamma, beta, mean, var):
    y = normalize(x, gamma, beta, mean, var, attrs["epsilon"])
    return bn_grad_reference(attrs, leaky_relu_grad(dr, y, attrs["alpha"]), x, gamma, mean, var)


define("batch_moments", shape=lambda a, x: bn_shape({"training": True}, x, (x[3],), (x[3],))[1:],
       reference=lambda a, x: batch_moments(x), outputs=("mean", "var"))
define("batch_normalize", shape=_normalize_shape,
       reference=lambda a, x, gamma, beta, mean, var:
       (normalize(x, gamma, beta, mean, var, a["epsilon"]),))
define("batch_norm_relu_grad", shape=lambda a, dr, x, gamma, beta, mean, var: [x, gamma, gamma],
       reference=_bn_relu_grad_ref, outputs=("dx", "dgamma", "dbeta"))
