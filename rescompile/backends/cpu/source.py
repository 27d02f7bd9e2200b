"""Helpers every kernel template shares: safe literals, names, and the module header.

Generated source contains only identifiers rescompile makes (`a0`, `o1`, `k_<hash>`) and
numbers rendered here from validated floats and ints; nothing from a spec or a run-time value
reaches it as text.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

HEADER = "import numpy as np\nimport numba\nfrom numba import prange\n\n\n"


@dataclass(frozen=True)
class Kernel:
    """Generated source for one kernel and how the driver passes each argument.

    `views[i]` says how argument i (the node's inputs, then its outputs) is shaped for the
    kernel: "nd" as the value's shape, "rows" as [-1, channels], "flat" as 1-D.
    """
    name: str
    source: str
    views: tuple[str, ...]
    flops: float = 0.0


@dataclass(frozen=True)
class Call:
    """One kernel call of a node's lowering: the kernel and the names of its arguments (the
    node's values, or temporaries the lowering declares)."""
    kernel: Kernel
    args: tuple[str, ...]


@dataclass(frozen=True)
class Lowering:
    """A node as kernel calls, with the temporaries (name -> shape, batch as "N") they use."""
    calls: tuple[Call, ...]
    temps: dict


def single(kernel: Kernel, node) -> Lowering:
    return Lowering((Call(kernel, tuple(node.inputs) + tuple(node.outputs)),), {})


def serial(lowering: Lowering) -> Lowering:
    """The same kernels compiled without threads: at batch 1 starting prange workers costs
    more than a whole layer (about 0.1 ms each, measured), and prange runs as range."""
    def one(kernel: Kernel) -> Kernel:
        name = f"{kernel.name}_serial"
        source = kernel.source.replace("parallel=True", "parallel=False")
        return Kernel(name, source.replace(f"def {kernel.name}(", f"def {name}("), kernel.views,
                      kernel.flops)
    calls = tuple(Call(one(c.kernel), c.args) for c in lowering.calls)
    return Lowering(calls, lowering.temps)


def literal(value, dtype: str) -> str:
    """A float as typed source text; refuses anything that is not a finite number."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"refusing to generate a non-finite literal {value!r}")
    return f"np.{dtype}({number!r})"


def integer(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an int for generated source, got {value!r}")
    return str(value)


def kernel_name(prefix: str, body: str) -> str:
    return f"{prefix}_{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def module(prefix: str, params: list[str], body: list[str], parallel: bool,
           doc: str) -> tuple[str, str]:
    """(name, module source) of one njit kernel with the given parameter names and body."""
    text = "\n".join("    " + line if line else "" for line in body)
    signature_free = f"{params}\n{text}\n{parallel}"
    name = kernel_name(prefix, signature_free)
    source = (HEADER + f"@numba.njit(cache=True, parallel={parallel})\n"
              f"def {name}({', '.join(params)}):\n    \"\"\"{doc}\"\"\"\n{text}\n")
    return name, source


def params_for(n_inputs: int, n_outputs: int) -> list[str]:
    return [f"a{i}" for i in range(n_inputs)] + [f"o{i}" for i in range(n_outputs)]
