"""fold_bn: fold inference batch norms into the convolution that produces them.

What: `batch_norm(conv2d(x, W), gamma, beta, mean, var)` becomes
`bias_add(conv2d(x, W'), b')` with `(W', b') = fold_bn_weights(W, gamma, beta, mean, var)`:
W' = W * gamma / sqrt(var + eps) per output channel, b' = beta - mean * gamma / sqrt(var + eps).
A batch norm that cannot fold becomes the per-channel affine it is,
`affine(x, bn_affine_params(gamma, beta, mean, var))`, which `fuse` puts in an epilogue.

Preconditions for a fold, each refusal reported with its reason:
- the batch norm is in infer mode (training uses batch statistics, which no weight can hold);
- its input is produced by a plain convolution (an op of kind "conv" that is not fused yet;
  not an add, a pool, or the graph input);
- that conv's output has no other consumer, which would need the unscaled value (in a
  pre-activation unit without activate_before_residual, x feeds the shortcut and init_bn);
- that output is not a public output of the graph.

Numerics: W' and b' are computed in float64 from the current variables and cast once to the
model dtype (in the prepare entry, once per variable load), so a float32 model sees one
rounding of W' instead of the unfolded graph's rounding of conv then normalise; the result
agrees with the unfolded graph to float rounding (about 1e-7 relative in float32, 1e-15 in
float64). The batch norm's output value keeps its name, so consumers are untouched; the
scaled conv output gets a new name (`<conv>:folded`), since it no longer means the conv's.
"""

from __future__ import annotations

from ..ir import Graph, Node
from ..ops.registry import get, kind_of
from .base import PassResult
from .rewrite import make_node, rebuild


def fold_bn(graph: Graph) -> PassResult:
    producers, consumers = graph.producers(), graph.consumers()
    protected = set(graph.outputs.values())
    values = dict(graph.values)
    nodes, remarks, changed = [], [], False
    for node in graph.nodes:
        if node.op != "batch_norm":
            nodes.append(node)
            continue
        if node.attrs["training"]:
            remarks.append((node.name, "training-mode batch_norm uses batch statistics"))
            nodes.append(node)
            continue
        conv = producers.get(node.inputs[0])
        reason = _fold_refusal(node, conv, consumers, protected)
        if reason is None:
            nodes = [n for n in nodes if n is not conv]
            nodes += _fold(values, conv, node)
        else:
            remarks.append((node.name, reason))
            nodes += _affine(values, node)
        changed = True
    return PassResult(rebuild(graph, nodes, values) if changed else graph, changed, remarks)


def _fold_refusal(bn: Node, conv: Node | None, consumers, protected) -> str | None:
    if conv is None:
        return f"producer is the graph input {bn.inputs[0]!r}"
    if kind_of(conv.op) != "conv" or get(conv.op).head:
        return f"producer is {conv.op}"
    others = [n.name for n in consumers[conv.outputs[0]] if n is not bn]
    if others:
        return (f"conv {conv.name} output has other consumers that need the unscaled value: "
                f"{', '.join(others)}")
    if conv.outputs[0] in protected:
        return f"conv {conv.name} output is a public output"
    return None


def _fold(values, conv: Node, bn: Node) -> list[Node]:
    """fold_bn_weights, the conv with the folded kernel, and the bias add (named as the BN)."""
    x, w = conv.inputs
    gamma, beta, mean, var = bn.inputs[1:]
    fold = make_node(values, "fold_bn_weights", [w, gamma, beta, mean, var],
                     {"epsilon": bn.attrs["epsilon"]}, name=f"{bn.name}/fold", scope=bn.scope,
                     phase=bn.phase)
    new_w, bias = fold.outputs
    # The scaled conv output is a new value: no reader may take it for the unscaled one.
    new_conv = make_node(values, conv.op, [x, new_w], conv.attrs, name=conv.name,
                         scope=conv.scope, phase=conv.phase, outputs=[f"{conv.outputs[0]}:folded"])
    add = make_node(values, "bias_add", [new_conv.outputs[0], bias], {}, name=bn.name,
                    scope=bn.scope, phase=bn.phase, outputs=bn.outputs)
    return [fold, new_conv, add]


def _affine(values, bn: Node) -> list[Node]:
    """bn_affine_params and the affine (named as the BN)."""
    x, gamma, beta, mean, var = bn.inputs
    params = make_node(values, "bn_affine_params", [gamma, beta, mean, var],
                       {"epsilon": bn.attrs["epsilon"]}, name=f"{bn.name}/affine_params",
                       scope=bn.scope, phase=bn.phase)
    affine = make_node(values, "affine", [x, *params.outputs], {}, name=bn.name, scope=bn.scope,
                       phase=bn.phase, outputs=bn.outputs)
    return [params, affine]
