"""The classifier head: dense layer, the matmuls its gradient needs, and the loss.

The loss is the mean softmax cross-entropy on the logits (the seed fed softmax probabilities into
it, a known bug we do not reproduce). Labels arrive one-hot (the runtime converts class ids).

Label smoothing is PyTorch's CrossEntropyLoss(label_smoothing=e): the cross-entropy against
labels * (1 - e) + e / C, for class ids and distributions alike. `smooth_labels` makes those
targets; the loss's gradient is then the cross-entropy's own, softmax * sum(targets) - targets
(over N), as PyTorch differentiates it. Labels are data, never differentiated, so
`smooth_labels` needs no vector-Jacobian rule of its own.
"""

import numpy as np

from .registry import define, per_image, require


def _dense_shape(attrs, x, w, b):
    require(len(x) == 2 and len(w) == 2, "dense takes [N, in] and [in, out]")
    require(x[1] == w[0], f"input has {x[1]} features, weight expects {w[0]}")
    require(tuple(b) == (w[1],), f"bias must be [{w[1]}]")
    return [(x[0], w[1])]


def _dense_vjp(g, node, dy):
    x, w, _ = node.inputs
    dx = g.emit("matmul", [dy, w], {"transpose_a": False, "transpose_b": True}, "dx")
    dw = g.emit("matmul", [x, dy], {"transpose_a": True, "transpose_b": False}, "dw")
    db = g.emit("sum_rows", [dy], {}, "db")
    return [dx, dw, db]


def _matmul_operands(attrs, a, b):
    """Operands after the requested transposes (shape tuples or 2-D arrays alike)."""
    a = (a[::-1] if isinstance(a, tuple) else a.T) if attrs["transpose_a"] else a
    b = (b[::-1] if isinstance(b, tuple) else b.T) if attrs["transpose_b"] else b
    return a, b


def _matmul_shape(attrs, a, b):
    a, b = _matmul_operands(attrs, tuple(a), tuple(b))
    require(a[1] == b[0], f"inner dimensions differ: {a[1]} vs {b[0]}")
    return [(a[0], b[1])]


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _xent_shape(attrs, logits, labels):
    require(tuple(logits) == tuple(labels), f"labels {list(labels)} must be one-hot like "
                                            f"the logits {list(logits)}")
    return [()]


def _xent_ref(attrs, logits, labels):
    return (-(labels * log_softmax(logits)).sum(axis=1).mean(),)


def _xent_grad_ref(attrs, dloss, logits, labels):
    probs = np.exp(log_softmax(logits))
    per_row = probs * labels.sum(axis=1, keepdims=True) - labels
    return (per_row * (dloss / logits.dtype.type(logits.shape[0])),)


def _xent_vjp(g, node, dloss):
    logits, labels = node.inputs
    return [g.emit("softmax_cross_entropy_grad", [dloss, logits, labels], {}, "dlogits"), None]


def _smooth_shape(attrs, labels):
    require(len(labels) == 2 and labels[1] == attrs["classes"],
            f"labels must be [N, {attrs['classes']}]")
    return [labels]


def _smooth_ref(attrs, labels):
    epsilon, kind = attrs["epsilon"], labels.dtype.type
    return (labels * kind(1 - epsilon) + kind(epsilon / attrs["classes"]),)


define("dense", kind="dense", shape=_dense_shape, reference=lambda a, x, w, b: (x @ w + b,),
       vjp=_dense_vjp,
       flops=lambda a, ins, outs: 2.0 * per_image(ins[0])[0] * ins[1][0] * ins[1][1])
define("matmul", kind="head_grad", shape=_matmul_shape,
       reference=lambda a, x, y: (np.matmul(*_matmul_operands(a, x, y)),))
define("sum_rows", kind="head_grad", shape=lambda a, x: [(x[1],)],
       reference=lambda a, x: (x.sum(axis=0),))
define("smooth_labels", kind="loss", shape=_smooth_shape, reference=_smooth_ref)
define("softmax_cross_entropy", kind="loss", shape=_xent_shape, reference=_xent_ref,
       vjp=_xent_vjp, outputs=("loss",))
define("softmax_cross_entropy_grad", kind="loss", shape=lambda a, d, logits, labels: [logits],
       reference=_xent_grad_ref)
