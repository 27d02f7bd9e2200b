"""Head and loss kernels: dense, the matmuls of its gradient, bias gradient, softmax
cross-entropy and its gradient, weight decay. Small tensors: serial loops, float64 sums."""

from ..source import Kernel, literal, module, params_for


def _serial(prefix, n_in, n_out, body, doc, views):
    name, source = module(prefix, params_for(n_in, n_out), body, False, doc)
    return Kernel(name, source, views)


def dense(node, graph, dtype):
    return _serial("dense", 3, 1, ["o0[:] = np.dot(a0, a1) + a2"], "dense", ("nd",) * 4)


def matmul(node, graph, dtype):
    a = "np.ascontiguousarray(a0.T)" if node.attrs["transpose_a"] else "a0"
    b = "np.ascontiguousarray(a1.T)" if node.attrs["transpose_b"] else "a1"
    return _serial("matmul", 2, 1, [f"o0[:] = np.dot({a}, {b})"], "matmul", ("nd",) * 3)


def sum_rows(node, graph, dtype):
    body = ["for c in range(a0.shape[1]):", "    s = 0.0",
            "    for r in range(a0.shape[0]):", "        s += a0[r, c]", "    o0[c] = s"]
    return _serial("sumrows", 1, 1, body, "sum over the batch", ("nd", "nd"))


_LOG_SOFTMAX = ["n_, k_ = a0.shape", "ls = np.empty_like(a0)", "for r in range(n_):",
                "    m = a0[r].max()", "    e = 0.0", "    for c in range(k_):",
                "        e += np.exp(a0[r, c] - m)", "    lse = np.log(e)",
                "    for c in range(k_):", "        ls[r, c] = a0[r, c] - m - lse"]


def softmax_cross_entropy(node, graph, dtype):
    body = _LOG_SOFTMAX + ["total = 0.0", "for r in range(n_):", "    for c in range(k_):",
                           "        total -= a1[r, c] * ls[r, c]", "o0[0] = total / n_"]
    return _serial("xent", 2, 1, body, "mean softmax cross-entropy", ("nd", "nd", "flat"))


def softmax_cross_entropy_grad(node, graph, dtype):
    body = [line.replace("a0", "a1") for line in _LOG_SOFTMAX] + [
        "scale = a0[0] / n_", "for r in range(n_):", "    l = a2[r].sum()",
        "    for c in range(k_):",
        "        o0[r, c] = (np.exp(ls[r, c]) * l - a2[r, c]) * scale"]
    return _serial("xentgrad", 3, 1, body, "softmax cross-entropy gradient",
                   ("flat", "nd", "nd", "nd"))


def l2_penalty(node, graph, dtype):
    n = len(node.inputs)
    body = ["total = 0.0"] + [f"total += np.sum(a{i} * a{i}) / 2" for i in range(n)]
    body += [f"o0[0] = {literal(node.attrs['scale'], dtype)} * total"]
    return _serial("l2", n, 1, body, "weight decay", ("flat",) * (n + 1))


def l2_penalty_grad(node, graph, dtype):
    body = [f"s = a0[0] * {literal(node.attrs['scale'], dtype)}",
            "for i in range(a1.shape[0]):", "    o0[i] = a1[i] * s"]
    return _serial("l2grad", 2, 1, body, "weight decay gradient", ("flat",) * 3)


TEMPLATES = {"dense": dense, "matmul": matmul, "sum_rows": sum_rows,
             "softmax_cross_entropy": softmax_cross_entropy,
             "softmax_cross_entropy_grad": softmax_cross_entropy_grad,
             "l2_penalty": l2_penalty, "l2_penalty_grad": l2_penalty_grad}
