"""Channel padding: the seed's shortcut zero-pads the channels of a unit's input to the unit's
width (`tf.pad` of the last axis by `before` and `after` zeros), and its gradient crops them
again. Each is the other's vector-Jacobian rule."""

import numpy as np

from .registry import define, require


def pad_channels_reference(before: int, after: int, x):
    return np.pad(x, ((0, 0),) * (x.ndim - 1) + ((before, after),))


def _pad_shape(attrs, x):
    require(attrs["before"] >= 0 and attrs["after"] >= 0, "channel pads must be >= 0")
    return [tuple(x[:-1]) + (x[-1] + attrs["before"] + attrs["after"],)]


def _crop_shape(attrs, x):
    kept = x[-1] - attrs["before"] - attrs["after"]
    require(attrs["before"] >= 0 and attrs["after"] >= 0 and kept >= 1,
            f"cannot crop {attrs['before']} + {attrs['after']} of {x[-1]} channels")
    return [tuple(x[:-1]) + (kept,)]


def _crop_ref(attrs, x):
    return (np.ascontiguousarray(x[..., attrs["before"]:x.shape[-1] - attrs["after"]]),)


def _other(op):
    """The vjp that applies `op` with the node's own pads to the gradient."""
    return lambda g, node, dy: [g.emit(op, [dy], dict(node.attrs), "dx")]


def _no_flops(attrs, in_shapes, out_shapes):
    return 0  # a copy with zeros: no arithmetic


KIND = "channels"
define("pad_channels", kind=KIND, shape=_pad_shape,
       reference=lambda a, x: (pad_channels_reference(a["before"], a["after"], x),),
       vjp=_other("crop_channels"), flops=_no_flops)
define("crop_channels", kind=KIND, shape=_crop_shape, reference=_crop_ref,
       vjp=_other("pad_channels"), flops=_no_flops)
