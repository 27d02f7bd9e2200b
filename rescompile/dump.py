"""Printable forms of a graph: text (one line per node), JSON (stable, machine-readable) and
Graphviz DOT."""

from __future__ import annotations

import json

from . import ops
from .ir import Graph

FORMATS = ("text", "json", "dot")
_SHORT = {"stride": "s", "padding": "pad", "epsilon": "eps", "alpha": "alpha", "k": "k"}


def _shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _attr_text(attrs: dict) -> str:
    parts = []
    for key, value in attrs.items():
        if isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, (list, tuple)):
            value = json.dumps(_plain(value), separators=(",", ":"))
        parts.append(f"{_SHORT.get(key, key)}={value}")
    return " ".join(parts)


def node_flops(graph: Graph, node) -> float:
    ins = [graph.values[v].shape for v in node.inputs]
    outs = [graph.values[v].shape for v in node.outputs]
    return ops.get(node.op).count_flops(node.attrs, ins, outs)


def summary(graph: Graph) -> dict:
    trainable = sum(_numel(graph.values[n].shape) for n in graph.inputs_with_role("param"))
    by_phase: dict[str, float] = {}
    for node in graph.nodes:
        by_phase[node.phase] = by_phase.get(node.phase, 0.0) + node_flops(graph, node)
    return {"nodes": len(graph.nodes), "ops": dict(sorted(graph.count_ops().items())),
            "trainable_params": trainable, "flops_per_image": by_phase}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def to_text(graph: Graph) -> str:
    lines = [f"graph dtype={graph.dtype}"]
    for name, role in graph.inputs.items():
        lines.append(f"  input %{name}: {_shape(graph.values[name].shape)} {role}")
    for node in graph.nodes:
        outs = ", ".join(f"%{o}" for o in node.outputs)
        args = ", ".join(f"%{i}" for i in node.inputs)
        shapes = ", ".join(_shape(graph.values[o].shape) for o in node.outputs)
        attrs = _attr_text(node.attrs)
        lines.append(f"{outs} = {node.op}({args}){' ' + attrs if attrs else ''} -> {shapes}"
                     f"  # {node.scope} [{node.phase}]")
    for key, value in graph.outputs.items():
        lines.append(f"  output {key} = %{value}")
    s = summary(graph)
    lines.append(f"# {s['nodes']} nodes: " + ", ".join(f"{k} {v}" for k, v in s["ops"].items()))
    lines.append(f"# trainable parameters: {s['trainable_params']:,}")
    lines.append("# FLOPs per image: " + ", ".join(f"{phase} {flops / 1e9:.4g} G"
                                                   for phase, flops in s["flops_per_image"].items()))
    return "\n".join(lines) + "\n"


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(graph: Graph) -> str:
    doc = {
        "dtype": graph.dtype,
        "inputs": [{"name": n, "role": r, "shape": list(graph.values[n].shape)}
                   for n, r in graph.inputs.items()],
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs),
                   "attrs": _plain(n.attrs), "scope": n.scope, "phase": n.phase,
                   "shapes": [list(graph.values[o].shape) for o in n.outputs]}
                  for n in graph.nodes],
        "outputs": dict(graph.outputs),
        "summary": summary(graph),
    }
    return json.dumps(doc, indent=1) + "\n"


def _dot_id(name: str) -> str:
    return json.dumps(name)


def kernel_label(node) -> str:
    """A node's op with the chains a fused node runs: `fused_conv2d[bias_add+relu]`, with
    `|` before a second output's chain, `>` after a prologue's (the chain on its input:
    `prologue_conv2d_grad_filter[batch_normalize+relu>]`) and `+stats` or `+<op>` for a
    reduction it makes."""
    attrs = node.attrs
    if "epilogue" not in attrs and "prologue" not in attrs:
        return node.op
    chains = ["+".join(step["op"] for step in attrs["epilogue"])] if "epilogue" in attrs else []
    if attrs.get("out2"):
        chains.append("+".join(step["op"] for step in attrs["out2"]))
    prologue = "+".join(step["op"] for step in attrs["prologue"]) + ">" \
        if "prologue" in attrs else ""
    label = f"{node.op}[{prologue}{'|'.join(chains)}]"
    if node.attrs.get("stats"):
        label += "+stats"
    if node.attrs.get("sums"):
        label += f"+{node.attrs['sums']['op']}"
    return label


def to_dot(graph: Graph) -> str:
    """One box per node (its op, fused chain, scope and output shape), one arrow per producer
    and consumer pair, labelled with the values it carries (a folded weight and its bias are
    one arrow)."""
    lines = ["digraph rescompile {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    producers = graph.producers()
    for name, role in graph.inputs.items():
        if role == "data":
            lines.append(f"  {_dot_id(name)} [shape=ellipse];")
    for node in graph.nodes:
        label = f"{kernel_label(node)}\n{node.scope}\n" \
                f"{_shape(graph.values[node.outputs[0]].shape)}"
        lines.append(f"  {_dot_id(node.name)} [label={json.dumps(label)}];")
        carried: dict[str, list[str]] = {}
        for value in dict.fromkeys(node.inputs):
            if value in producers:
                carried.setdefault(producers[value].name, []).append(value)
            elif graph.inputs.get(value) == "data":
                carried.setdefault(value, []).append(value)
        for source, values in carried.items():
            lines.append(f"  {_dot_id(source)} -> {_dot_id(node.name)} "
                         f"[label={json.dumps(chr(10).join(values))}, fontsize=8];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(graph: Graph, fmt: str = "text") -> str:
    renderers = {"text": to_text, "json": to_json, "dot": to_dot}
    if fmt not in renderers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return renderers[fmt](graph)
