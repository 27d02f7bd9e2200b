"""Convolutions: IR conv nodes lowered onto the generated GEMM kernels of conv_codegen.

The conv kernel applies bias / affine / leaky-ReLU / residual-add steps and a second output
relu(affine(y)) while each chunk is in cache. IR epilogue steps map onto those one to one; a
`batch_normalize` step (training) becomes an affine whose scale and shift a small kernel
computes first, with the op's own arithmetic. What the conv kernel cannot express (a second
output of another shape, batch statistics of the output) runs as a following kernel over the
output, so every fused node lowers, fused as far as the kernel allows.
"""

from __future__ import annotations

from ....padding import pads_2d
from ..conv_codegen import ConvSig, conv_kernel_source
from ..source import Call, Kernel, Lowering, literal, module, params_for
from .elementwise import elementwise_kernel, moments_code


def _sig(op: str, x_shape, w_shape, attrs, dtype: str, **extra) -> ConvSig:
    _, h, w, cin = x_shape
    k, cout = w_shape[0], w_shape[3]
    pads = pads_2d(h, w, k, attrs["stride"], attrs["padding"])
    return ConvSig(op=op, h=h, w=w, cin=cin, cout=cout, k=k, stride=attrs["stride"],
                   pads=pads, dtype=dtype, **extra)


def _conv_kernel(sig: ConvSig) -> Kernel:
    name, source = conv_kernel_source(sig)
    n_args = source.split(f"def {name}(", 1)[1].split(")", 1)[0].count(",") + 1
    return Kernel(name, source, ("nd",) * n_args)


def _scale_shift_kernel(eps, dtype: str) -> Kernel:
    """scale = gamma / sqrt(var + eps), shift = beta - mean * scale (ops/norm.normalize)."""
    body = [f"inv = a0 / np.sqrt(a3 + {literal(eps, dtype)})", "o0[:] = inv",
            "o1[:] = a1 - a2 * inv"]
    name, source = module("bnaffine", params_for(4, 2), body, False, "batch_normalize affine")
    return Kernel(name, source, ("flat",) * 6)


class _Translation:
    """IR epilogue steps -> conv_codegen steps, kernel arguments and preparatory calls."""

    def __init__(self, node, dtype: str, channels: int):
        self.node, self.dtype, self.channels = node, dtype, channels
        self.steps, self.args, self.pre, self.temps = [], [], [], {}

    def affine_operands(self, step, tag: str) -> list[str]:
        names = [self.node.inputs[i] for i in step["args"]]
        if step["op"] == "affine":
            return names
        scale, shift = f"{self.node.name}#scale{tag}", f"{self.node.name}#shift{tag}"
        self.temps.update({scale: (self.channels,), shift: (self.channels,)})
        self.pre.append(Call(_scale_shift_kernel(step["epsilon"], self.dtype),
                             tuple(names) + (scale, shift)))
        return [scale, shift]

    def step(self, step, index: int) -> None:
        op = step["op"]
        if op == "relu":
            self.steps.append(("relu", step["alpha"]))
        elif op in ("affine", "batch_normalize"):
            self.steps.append(("affine",))
            self.args += self.affine_operands(step, str(index))
        else:
            self.steps.append(("bias",) if op == "bias_add" else ("add",))
            self.args.append(self.node.inputs[step["args"][0]])


def _out2_in_kernel(out2) -> bool:
    """conv_codegen's second output is relu(affine(y)) exactly."""
    return (len(out2) == 2 and out2[0]["op"] in ("affine", "batch_normalize")
            and out2[1]["op"] == "relu")


def fused_conv2d(node, graph, dtype):
    x, w = (graph.value(v).shape for v in node.inputs[:2])
    attrs, outs = node.attrs, list(node.outputs)
    t = _Translation(node, dtype, w[3])
    for index, step in enumerate(attrs["epilogue"]):
        t.step(step, index)
    out2 = list(attrs.get("out2") or [])
    fused_out2 = bool(out2) and _out2_in_kernel(out2)
    alpha2 = out2[1]["alpha"] if fused_out2 else 0.0
    if fused_out2:
        t.args += t.affine_operands(out2[0], "2")
    sig = _sig("forward", x, w, attrs, dtype, epilogue=tuple(t.steps), has_out2=fused_out2,
               alpha2=alpha2)
    conv_outs = outs[:2] if fused_out2 else outs[:1]
    calls = t.pre + [Call(_conv_kernel(sig), tuple(node.inputs[:2]) + tuple(t.args)
                          + tuple(conv_outs))]
    if out2 and not fused_out2:
        kernel = elementwise_kernel(_reindexed(out2), None, False, len(node.inputs) + 1, dtype,
                                    "second output")
        calls.append(Call(kernel, (outs[0],) + tuple(node.inputs) + (outs[1],)))
    if attrs.get("stats"):
        calls.append(Call(_moments_kernel(dtype), (outs[0], outs[-2], outs[-1])))
    return Lowering(tuple(calls), t.temps)


def _reindexed(steps):
    """Steps over the node's inputs, shifted by one for an elementwise kernel whose first
    argument is the flowing value."""
    return [dict(s, args=[i + 1 for i in s["args"]]) for s in steps]


def _moments_kernel(dtype: str) -> Kernel:
    name, source = module("moments", params_for(1, 2), moments_code("a0", "o0", "o1", dtype),
                          True, "batch mean and variance")
    return Kernel(name, source, ("rows", "flat", "flat"))


def conv2d(node, graph, dtype):
    x, w = (graph.value(v).shape for v in node.inputs)
    return _conv_kernel(_sig("forward", x, w, node.attrs, dtype))


def conv2d_grad_input(node, graph, dtype):
    dy, w = (graph.value(v).shape for v in node.inputs)
    h, wd = node.attrs["in_hw"]
    return _conv_kernel(_sig("grad_input", (dy[0], h, wd, w[2]), w, node.attrs, dtype))


def conv2d_grad_filter(node, graph, dtype):
    x, dy = (graph.value(v).shape for v in node.inputs)
    k = node.attrs["k"]
    return _conv_kernel(_sig("grad_filter", x, (k, k, x[3], dy[3]), node.attrs, dtype))


TEMPLATES = {"conv2d": conv2d, "fused_conv2d": fused_conv2d,
             "conv2d_grad_input": conv2d_grad_input, "conv2d_grad_filter": conv2d_grad_filter}
