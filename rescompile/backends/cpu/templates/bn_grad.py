"""Batch-norm backward: the full gradient through the batch mean and variance, optionally with
the ReLU-backward of the normalised value fused in (it recomputes the normalised value from
the saved input instead of keeping it). Two passes: per-channel sums in float64 chunks (fixed
order, deterministic), then dx."""

from ..source import Kernel, literal, module, params_for
from .elementwise import MOMENT_CHUNKS


def _dy_lines(relu: bool, dtype: str, alpha) -> list[str]:
    if not relu:
        return ["g = a0[r, c]"]
    return ["g = a0[r, c]", "y = a1[r, c] * inv_n[c] + shift[c]",
            "if y < 0:", f"    g = g * {literal(alpha, dtype)}"]


def _kernel(relu: bool, eps, alpha, dtype: str):
    gamma, mean, var = ("a2", "a4", "a5") if relu else ("a2", "a3", "a4")
    setup = [f"inv_std = {literal(1.0, dtype)} / np.sqrt({var} + {literal(eps, dtype)})",
             "rows_, chans_ = a1.shape", f"count = np.{dtype}(rows_)"]
    if relu:
        setup += [f"inv_n = {gamma} / np.sqrt({var} + {literal(eps, dtype)})",
                  f"shift = a3 - {mean} * inv_n"]
    dy = _dy_lines(relu, dtype, alpha)
    sums = [f"step_ = (rows_ + {MOMENT_CHUNKS - 1}) // {MOMENT_CHUNKS}",
            f"pb = np.zeros(({MOMENT_CHUNKS}, chans_), np.float64)",
            f"pg = np.zeros(({MOMENT_CHUNKS}, chans_), np.float64)",
            f"for ch_ in prange({MOMENT_CHUNKS}):",
            "    for r in range(ch_ * step_, min(rows_, (ch_ + 1) * step_)):",
            "        for c in range(chans_):"] + ["            " + l for l in dy] + [
            f"            xhat = (a1[r, c] - {mean}[c]) * inv_std[c]",
            "            pb[ch_, c] += g", "            pg[ch_, c] += g * xhat",
            "for c in range(chans_):", "    o2[c] = pb[:, c].sum()", "    o1[c] = pg[:, c].sum()"]
    dx = ["for r in prange(rows_):", "    for c in range(chans_):"] + \
         ["        " + l for l in dy] + [
         f"        xhat = (a1[r, c] - {mean}[c]) * inv_std[c]",
         f"        o0[r, c] = ({gamma}[c] * inv_std[c] / count) * (count * g - o2[c] - xhat * o1[c])"]
    n_in = 6 if relu else 5
    name, source = module("bnrelugrad" if relu else "bngrad", params_for(n_in, 3),
                          setup + sums + dx, True, "batch norm gradient")
    views = ("rows", "rows") + ("flat",) * (n_in - 2) + ("rows", "flat", "flat")
    return Kernel(name, source, views)


def batch_norm_grad(node, graph, dtype):
    return _kernel(False, node.attrs["epsilon"], None, dtype)


def batch_norm_relu_grad(node, graph, dtype):
    return _kernel(True, node.attrs["epsilon"], node.attrs["alpha"], dtype)


TEMPLATES = {"batch_norm_grad": batch_norm_grad, "batch_norm_relu_grad": batch_norm_relu_grad}
