"""Ops that only passes create. Each is defined by composing the core ops' references, so a
fused op can never mean something its parts do not.

An epilogue is a list of steps applied in order to a value, each a dict
`{"op": name, "args": [operand indices], **attrs}` naming an op of kind "epilogue"
(`bias_add`, `affine`, `relu`, `add`, `add_pooled`, `batch_normalize`, `relu_grad`); the value
flows in as
the op's first input and `args` index the node's inputs for the rest.
`add_pooled` is the seed's shortcut read where it is added: `x + pad_channels(avg_pool(s))`, so
the pooled, padded tensor is never written; `pool_pad_grad` is its gradient in one kernel,
`avg_pool_grad(crop_channels(dy))`. `out2` is a second
epilogue applied to the first output, giving a second output (a unit's `x + shortcut` and the
next unit's BN-ReLU of it). `stats` (training) appends the batch mean and variance of the
first output, exactly as `batch_moments` computes them, so a batch norm's reduction runs in its
producer's kernel.
"""

import numpy as np

from .channels import pad_channels_reference
from .conv import conv_reference, conv_shape, conv_flops
from ..precision import stored
from .norm import NUMPY, batch_moments, bn_affine, check_channels
from .pool import avg_pool_reference
from .registry import define, get, numel, ops_of_kind, require


def step_attrs(step: dict) -> dict:
    return {k: v for k, v in step.items() if k not in ("op", "args")}


def apply_epilogue(steps, value, operands):
    for step in steps:
        args = [operands[i] for i in step["args"]]
        (value,) = get(step["op"]).run_reference(step_attrs(step), value, *args)
    return value


def check_epilogue(steps, out_shape, shapes) -> None:
    """Each step names an epilogue op whose shape rule takes the value and its args."""
    for step in steps:
        require(step["op"] in ops_of_kind("epilogue"),
                f"epilogue step {step['op']!r} is not one of {ops_of_kind('epilogue')}")
        get(step["op"]).shape(step_attrs(step), out_shape, *[shapes[i] for i in step["args"]])


def _outputs(attrs, out_shape):
    shapes = [out_shape] * (2 if attrs.get("out2") else 1)
    return shapes + [(out_shape[-1],)] * 2 if attrs.get("stats") else shapes


def _output_names(attrs):
    names = ("y", "y2") if attrs.get("out2") else ("y",)
    return names + ("mean", "var") if attrs.get("stats") else names


def _finish(attrs, y, operands):
    """The outputs of a fused op whose first epilogue gave `y` (as its kernel stores it: the
    rest is made of the stored `y`)."""
    y = stored(y)
    results = (y,)
    if attrs.get("out2"):
        results += (apply_epilogue(attrs["out2"], y, operands),)
    return results + batch_moments(y) if attrs.get("stats") else results


def _fused_conv_shape(attrs, x, w, *rest):
    (out,) = conv_shape(attrs, x, w)
    shapes = (x, w) + rest
    check_epilogue(attrs["epilogue"], out, shapes)
    check_epilogue(attrs.get("out2", ()), out, shapes)
    return _outputs(attrs, out)


def _fused_conv_ref(attrs, x, w, *rest):
    operands = (x, w) + rest
    (y,) = conv_reference(attrs, x, w)
    return _finish(attrs, apply_epilogue(attrs["epilogue"], y, operands), operands)


def _fused_elementwise_shape(attrs, x, *rest):
    shapes = (x,) + rest
    check_epilogue(attrs["epilogue"], x, shapes)
    check_epilogue(attrs.get("out2", ()), x, shapes)
    return _outputs(attrs, x)


def _fused_elementwise_ref(attrs, x, *rest):
    operands = (x,) + rest
    return _finish(attrs, apply_epilogue(attrs["epilogue"], x, operands), operands)


def bn_scale_shift(gamma, beta, mean, var, eps):
    """The affine a batch_norm with fixed statistics is, computed in float64."""
    gamma, beta, mean, var = (v.astype(np.float64) for v in (gamma, beta, mean, var))
    return bn_affine(NUMPY, gamma, beta, mean, var, np.float64(eps))


def _fold_ref(attrs, w, gamma, beta, mean, var):
    """W' = W * gamma / sqrt(var + eps) per output channel, b' = beta - mean * that; in
    float64, cast once to the model's dtype."""
    scale, shift = bn_scale_shift(gamma, beta, mean, var, attrs["epsilon"])
    return (w.astype(np.float64) * scale).astype(w.dtype), shift.astype(w.dtype)


def _affine_params_ref(attrs, gamma, beta, mean, var):
    scale, shift = bn_scale_shift(gamma, beta, mean, var, attrs["epsilon"])
    return scale.astype(gamma.dtype), shift.astype(gamma.dtype)


def _bias_shape(attrs, x, b):
    check_channels(x, b)
    return [x]


def _fold_shape(attrs, w, gamma, beta, mean, var):
    require(tuple(gamma) == (w[-1],), f"BN has {gamma[0]} channels, the conv makes {w[-1]}")
    return [w, gamma]


def pool_pad_params(attrs) -> tuple[int, int]:
    """(k, before) of any op of the pooled shortcut or its gradient: avg_pool and
    avg_pool_grad have no channel offset (before = 0), pad_channels and crop_channels no pool
    (k = 1), add_pooled and pool_pad_grad both."""
    return attrs.get("k", 1), attrs.get("before", 0)


def pooled_shape(attrs, other) -> tuple:
    """The shape of `other` average-pooled over k x k blocks and channel-padded."""
    k, n, h, w, c = attrs["k"], *other
    return (n, h // k, w // k, c + attrs["before"] + attrs["after"])


def _add_pooled_shape(attrs, x, other):
    require(len(other) == 4 and pooled_shape(attrs, other) == tuple(x),
            f"the pooled, padded shortcut {list(pooled_shape(attrs, other))} does not match "
            f"{list(x)}")
    return [x]


def _add_pooled_ref(attrs, x, other):
    pooled = avg_pool_reference(attrs["k"], other)
    return (x + pad_channels_reference(attrs["before"], attrs["after"], pooled),)


def _pool_pad_grad_ref(attrs, dy):
    (cropped,) = get("crop_channels").run_reference(attrs, dy)
    return get("avg_pool_grad").run_reference(attrs, cropped)


def _pool_pad_grad_shape(attrs, dy):
    (cropped,) = get("crop_channels").shape(attrs, dy)
    return get("avg_pool_grad").shape(attrs, cropped)


define("add_pooled", kind="epilogue", shape=_add_pooled_shape, reference=_add_pooled_ref,
       flops=lambda a, ins, outs: numel(outs[0]) * (a["k"] ** 2 + 1))
define("pool_pad_grad", kind="window", shape=_pool_pad_grad_shape, reference=_pool_pad_grad_ref,
       flops=lambda a, ins, outs: numel(outs[0]))
define("bias_add", kind="epilogue", shape=_bias_shape, reference=lambda a, x, b: (x + b,))
define("fused_conv2d", kind="conv", head="conv2d", inputs=("x", "w"), shape=_fused_conv_shape,
       reference=_fused_conv_ref, outputs=_output_names,
       flops=lambda a, ins, outs: conv_flops(outs[0], ins[1][0], ins[1][2]))
define("fused_elementwise", kind="elementwise", shape=_fused_elementwise_shape,
       reference=_fused_elementwise_ref,
       outputs=_output_names)
define("fold_bn_weights", kind="parameter", shape=_fold_shape, reference=_fold_ref,
       outputs=("w", "b"))
define("bn_affine_params", kind="parameter", shape=lambda a, gamma, beta, mean, var: [gamma, gamma],
       reference=_affine_params_ref, outputs=("scale", "shift"))
