"""Pooling kernels: max pool (ImageNet stem) and global average pool, with gradients.
Window geometry (stride, SAME or symmetric pads) is baked in as literals."""

from ....padding import pads_2d
from ..source import Kernel, integer, literal, module, params_for


def _geometry(node, graph):
    _, h, w, c = graph.value(node.inputs[-1] if node.op == "max_pool_grad" else node.inputs[0]).shape
    k, s = node.attrs["k"], node.attrs["stride"]
    top, _, left, _ = pads_2d(h, w, k, s, node.attrs["padding"])
    return {n: integer(v) for n, v in dict(H=h, W=w, K=k, S=s, PT=top, PL=left).items()}


def _window(g, body):
    """Loop over the valid taps of output pixel (oh, ow), in TensorFlow's tap order."""
    return [f"for i in range({g['K']}):",
            f"    h = oh * {g['S']} + i - {g['PT']}",
            f"    if h < 0 or h >= {g['H']}:", "        continue",
            f"    for j in range({g['K']}):",
            f"        w = ow * {g['S']} + j - {g['PL']}",
            f"        if w < 0 or w >= {g['W']}:", "            continue"] + \
           ["        " + line for line in body]


def max_pool(node, graph, dtype):
    g = _geometry(node, graph)
    body = ["n_, oh_n, ow_n, chans = o0.shape", "for n in prange(n_):",
            "    for oh in range(oh_n):", "        for ow in range(ow_n):",
            "            for c in range(chans):", "                o0[n, oh, ow, c] = -np.inf"]
    body += ["            " + line for line in _window(g, [
        "for c in range(chans):", "    v = a0[n, h, w, c]",
        "    if v > o0[n, oh, ow, c]:", "        o0[n, oh, ow, c] = v"])]
    name, source = module("maxpool", params_for(1, 1), body, True, "max pool")
    return Kernel(name, source, ("nd", "nd"))


def max_pool_grad(node, graph, dtype):
    """Each window's gradient goes to its first maximum (TensorFlow's MaxPoolGrad)."""
    g = _geometry(node, graph)
    body = ["n_, oh_n, ow_n, chans = a0.shape", "for n in prange(n_):",
            "    o0[n] = 0", "    for oh in range(oh_n):", "        for ow in range(ow_n):",
            "            for c in range(chans):", "                best = -np.inf",
            "                bh = -1", "                bw = -1"]
    body += ["                " + line for line in _window(g, [
        "v = a1[n, h, w, c]", "if v > best:", "    best = v", "    bh = h", "    bw = w"])]
    body += ["                o0[n, bh, bw, c] += a0[n, oh, ow, c]"]
    name, source = module("maxpoolgrad", params_for(2, 1), body, True, "max pool gradient")
    return Kernel(name, source, ("nd", "nd", "nd"))


def global_avg_pool(node, graph, dtype):
    _, h, w, _ = graph.value(node.inputs[0]).shape
    body = ["n_, hh, ww, chans = a0.shape", "for n in prange(n_):",
            "    for c in range(chans):", "        s = 0.0",
            "        for i in range(hh):", "            for j in range(ww):",
            "                s += a0[n, i, j, c]",
            f"        o0[n, c] = s / {integer(h * w)}"]
    name, source = module("gap", params_for(1, 1), body, True, "global average pool")
    return Kernel(name, source, ("nd", "nd"))


def global_avg_pool_grad(node, graph, dtype):
    h, w = node.attrs["in_hw"]
    body = ["n_, hh, ww, chans = o0.shape", "for n in prange(n_):",
            "    for c in range(chans):", f"        v = a0[n, c] / {literal(h * w, dtype)}",
            "        for i in range(hh):", "            for j in range(ww):",
            "                o0[n, i, j, c] = v"]
    name, source = module("gapgrad", params_for(1, 1), body, True, "global average pool grad")
    return Kernel(name, source, ("nd", "nd"))


TEMPLATES = {"max_pool": max_pool, "max_pool_grad": max_pool_grad,
             "global_avg_pool": global_avg_pool, "global_avg_pool_grad": global_avg_pool_grad}
