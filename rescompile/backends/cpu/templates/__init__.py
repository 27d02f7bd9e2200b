"""Kernel templates by op. A template turns one node into generated kernels; most ops are one
kernel, a few lower to several calls (a conv whose batch statistics follow it, say)."""

from ....errors import GraphError
from ..source import Kernel, Lowering, single
from . import bn_grad, conv, elementwise, head, pool, update

TEMPLATES = {}
for _family in (elementwise, pool, head, update, bn_grad, conv):
    TEMPLATES.update(_family.TEMPLATES)


def lower_node(node, graph, dtype: str) -> Lowering:
    template = TEMPLATES.get(node.op)
    if template is None:
        raise GraphError(f"node {node.name!r}: the cpu backend has no kernel for op {node.op!r}")
    result = template(node, graph, dtype)
    return single(result, node) if isinstance(result, Kernel) else result
