"""Training-only ops: weight decay, optimizer updates and moving statistics.

Weight decay is `scale * sum(sum(w**2) / 2)` (TensorFlow's l2_loss summed, times the rate).
Momentum is TensorFlow's ApplyMomentum: accum = m * accum + g; w -= lr * accum.
Nesterov momentum is PyTorch's SGD(nesterov=True) (dampening 0): accum = m * accum + g;
w -= lr * (g + m * accum), the step taken from where the momentum is about to carry w.
Moving statistics follow assign_moving_average: v -= (v - batch) * (1 - decay); with zero
debiasing TF keeps a `biased` accumulator (updated the same way) and a step count, and sets
v = biased / (1 - decay ** step).
"""

import numpy as np

from .registry import define, numel, require


def _scalar_like(a):
    return a.dtype.type


def _l2_ref(attrs, *ws):
    total = sum(np.sum(np.square(w)) / w.dtype.type(2) for w in ws)
    return (_scalar_like(ws[0])(attrs["scale"]) * total,)


def _l2_vjp(g, node, dy):
    return [g.emit("l2_penalty_grad", [dy, w], node.attrs, f"d{i}") for i, w in
            enumerate(node.inputs)]


def _momentum_ref(attrs, w, accum, grad, lr):
    new_accum = accum * w.dtype.type(attrs["momentum"]) + grad
    return w - lr * new_accum, new_accum


def _nesterov_ref(attrs, w, accum, grad, lr):
    momentum = w.dtype.type(attrs["momentum"])
    new_accum = accum * momentum + grad
    return w - lr * (grad + new_accum * momentum), new_accum


def moving_rate(decay: float, dtype) -> np.floating:
    """TensorFlow materialises `1 - decay` as a float32 constant and casts it to the variable's
    dtype, so even a float64 model moves by the float32-rounded rate; we do the same."""
    return np.dtype(dtype).type(np.float32(1.0 - decay))


def _moving_average(moving, batch, decay):
    return moving - (moving - batch) * moving_rate(decay, moving.dtype)


def _debiased_ref(attrs, biased, step, batch):
    rate = moving_rate(attrs["decay"], biased.dtype)
    new_biased = _moving_average(biased, batch, attrs["decay"])
    new_step = step + step.dtype.type(1)
    factor = step.dtype.type(1) - np.power(step.dtype.type(1) - rate, new_step)
    return new_biased, new_step, new_biased / factor


def _same_as_first(attrs, first, *rest):
    for r in rest:
        require(tuple(r) in (tuple(first), ()), f"operand {list(r)} does not match {list(first)}")
    return [first]


define("l2_penalty", kind="loss", shape=lambda a, *ws: [()], reference=_l2_ref, vjp=_l2_vjp,
       flops=lambda a, ins, outs: 2.0 * sum(numel(s) for s in ins))
define("l2_penalty_grad", kind="loss", shape=lambda a, dy, w: [w],
       reference=lambda a, dy, w: (w * (dy * w.dtype.type(a["scale"])),))
define("momentum_update", kind="update",
       shape=lambda a, w, acc, g, lr: _same_as_first(a, w, acc, g, lr) * 2,
       reference=_momentum_ref, outputs=("w", "accum"))
define("nesterov_update", kind="update",
       shape=lambda a, w, acc, g, lr: _same_as_first(a, w, acc, g, lr) * 2,
       reference=_nesterov_ref, outputs=("w", "accum"))
define("sgd_update", kind="update", shape=lambda a, w, g, lr: _same_as_first(a, w, g, lr),
       reference=lambda a, w, g, lr: (w - lr * g,))
define("moving_average", kind="moving_statistics", shape=lambda a, m, b: _same_as_first(a, m, b),
       reference=lambda a, m, b: (_moving_average(m, b, a["decay"]),))
define("debiased_moving_average", kind="moving_statistics",
       shape=lambda a, biased, step, b: [biased, step, biased],
       reference=_debiased_ref, outputs=("biased", "local_step", "moving"))
