"""Ops that only the training fusion passes create.

A train-mode `batch_norm` is split into its two halves, the reduction and the normalisation,
so each half can join a neighbouring kernel; its gradient likewise, into its two sums and its
elementwise apply. Each half runs exactly the arithmetic of the whole, so splitting changes no
bits.

- batch_moments(x) -> (mean, var): the batch statistics over N, H, W (biased variance).
- batch_normalize(x, gamma, beta, mean, var): normalise with given statistics; an epilogue op.
- batch_norm_relu_grad(dr, x, gamma, beta, mean, var): `batch_norm_grad` of
  `relu_grad(dr, batch_normalize(x, ...))`. It recomputes the normalised value from the saved
  conv output instead of keeping it alive until the backward pass. Its halves are
  batch_norm_relu_grad_sums and batch_norm_relu_grad_apply, as batch_norm_grad's are
  batch_norm_grad_sums and batch_norm_grad_apply (`GRAD_HALVES`).
- fused_<head> for the gradient kernels that take an epilogue: the head,
  then its first output through `epilogue` steps (a gradient add, say), whose args index the
  fused node's inputs after the head's own; `fused_conv2d_grad_input` also takes `sums`, a step
  naming a norm_grad_sums op whose outputs (of the data gradient it makes) it appends, so a
  batch-norm gradient's reduction reads the data gradient while it is being written.
- prologue_<head> for the kernels that can read their input through per-channel steps: the
  head on `prologue` steps applied to its first input (args index the node's inputs, as an
  epilogue's do), the result stored as the tensor would be (`stored`), so a batch norm and
  ReLU whose output only 1 x 1 convolutions and their weight gradients read is never written.
"""

from ..precision import stored
from .elementwise import leaky_relu_grad
from .fused import apply_epilogue, check_epilogue, step_attrs
from .norm import (SUMS, bn_grad_apply_reference, bn_grad_sums_reference, bn_shape,
                   check_channels, batch_moments, normalize)
from .registry import define, get

RELU_GRAD = ("dy", "x", "gamma", "beta", "mean", "var")  # batch_norm_relu_grad's inputs


def _normalize_shape(attrs, x, gamma, beta, mean, var):
    check_channels(x, gamma, beta, mean, var)
    return [x]


def _relu_dy(attrs, dr, x, gamma, beta, mean, var):
    """The gradient at the batch norm's output: dr through the leaky ReLU of its recomputed
    normalised value."""
    return leaky_relu_grad(dr, normalize(x, gamma, beta, mean, var, attrs["epsilon"]),
                           attrs["alpha"])


def _bn_relu_grad_sums_ref(attrs, dr, x, gamma, beta, mean, var):
    dy = _relu_dy(attrs, dr, x, gamma, beta, mean, var)
    return bn_grad_sums_reference(attrs, dy, x, gamma, mean, var)


def _bn_relu_grad_apply_ref(attrs, dr, x, gamma, beta, mean, var, dgamma, dbeta):
    dy = _relu_dy(attrs, dr, x, gamma, beta, mean, var)
    return bn_grad_apply_reference(attrs, dy, x, gamma, mean, var, dgamma, dbeta)


def _bn_relu_grad_ref(attrs, *inputs):
    dgamma, dbeta = _bn_relu_grad_sums_ref(attrs, *inputs)
    (dx,) = _bn_relu_grad_apply_ref(attrs, *inputs, dgamma, dbeta)
    return dx, dgamma, dbeta


def _moments_shape(attrs, x):
    return bn_shape({"training": True}, x, (x[3],), (x[3],))[1:]


define("batch_moments", kind="statistics", inputs=("x",), shape=_moments_shape,
       reference=lambda a, x: batch_moments(x), outputs=("mean", "var"))
define("batch_normalize", kind="epilogue", shape=_normalize_shape,
       reference=lambda a, x, gamma, beta, mean, var:
       (normalize(x, gamma, beta, mean, var, a["epsilon"]),))
define("batch_norm_relu_grad", kind="norm_grad", inputs=RELU_GRAD,
       shape=lambda a, dr, x, gamma, beta, mean, var: [x, gamma, gamma],
       reference=_bn_relu_grad_ref, outputs=("dx",) + SUMS)
define("batch_norm_relu_grad_sums", kind="norm_grad_sums", inputs=RELU_GRAD,
       shape=lambda a, dr, x, gamma, beta, mean, var: [gamma, gamma],
       reference=_bn_relu_grad_sums_ref, outputs=SUMS)
define("batch_norm_relu_grad_apply", kind="norm_grad", inputs=RELU_GRAD + SUMS,
       shape=lambda a, dr, x, gamma, beta, mean, var, dgamma, dbeta: [x],
       reference=_bn_relu_grad_apply_ref, outputs=("dx",))

# A whole batch-norm gradient -> (its sums, its apply); the apply reads the whole's inputs,
# then the sums.
GRAD_HALVES = {"batch_norm_grad": ("batch_norm_grad_sums", "batch_norm_grad_apply"),
               "batch_norm_relu_grad": ("batch_norm_relu_grad_sums",
                                        "batch_norm_relu_grad_apply")}
# A batch-norm gradient (whole or a half) -> the same through the ReLU after the batch norm.
RELU_FORMS = dict(zip(("batch_norm_grad", *GRAD_HALVES["batch_norm_grad"]),
                      ("batch_norm_relu_grad", *GRAD_HALVES["batch_norm_relu_grad"])))


def _define_epilogue_form(head: str, takes_sums: bool) -> None:
    """Define fused_<head>: head with an epilogue on its first output (and `sums`)."""
    base = get(head)
    own = len(base.inputs)

    def sums_outputs(attrs, value, operands):
        step = attrs.get("sums")
        if not step:
            return ()
        return tuple(get(step["op"]).run_reference(step_attrs(step), value,
                                                   *[operands[i] for i in step["args"]]))

    def shape(attrs, *shapes):
        outs = list(base.shape(attrs, *shapes[:own]))
        check_epilogue(attrs["epilogue"], outs[0], shapes)
        step = attrs.get("sums")
        if step:
            outs += get(step["op"]).shape(step_attrs(step), outs[0],
                                          *[shapes[i] for i in step["args"]])
        return outs

    def reference(attrs, *arrays):
        results = list(base.run_reference(attrs, *arrays[:own]))
        results[0] = stored(apply_epilogue(attrs["epilogue"], results[0], arrays))
        return tuple(results) + sums_outputs(attrs, results[0], arrays)

    def outputs(attrs):
        step = attrs.get("sums")
        return base.outputs + (get(step["op"]).outputs if step else ())

    define(f"fused_{head}", kind=base.kind, head=head, inputs=base.inputs, shape=shape,
           reference=reference, outputs=outputs if takes_sums else base.outputs,
           flops=base.flops)


_define_epilogue_form("conv2d_grad_input", takes_sums=True)
for _apply in ("batch_norm_grad_apply", "batch_norm_relu_grad_apply"):
    _define_epilogue_form(_apply, takes_sums=False)


def _define_prologue_form(head: str, own: int | None) -> None:
    """Define prologue_<head>: head on its first input through `prologue` steps; the head
    reads the node's first `own` inputs (None: every input)."""
    base = get(head)

    def shape(attrs, x, *rest):
        check_epilogue(attrs["prologue"], x, (x,) + rest)
        return base.shape(attrs, *((x,) + rest)[:own])

    def reference(attrs, x, *rest):
        arrays = (x,) + rest
        activated = stored(apply_epilogue(attrs["prologue"], x, arrays))
        return base.run_reference(attrs, *((activated,) + rest)[:own])

    define(f"prologue_{head}", kind=base.kind, inputs=base.inputs, shape=shape,
           reference=reference, outputs=base.outputs, flops=base.flops)


_define_prologue_form("fused_conv2d", own=None)
_define_prologue_form("conv2d_grad_filter", own=2)
