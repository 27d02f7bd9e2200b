"""The module text around every generated kernel: imports, decorator, signature."""

from __future__ import annotations

HEADER = "import math\n\nimport numpy as np\nfrom numba import cuda\n\n\n"


def kernel_module(params: list[str], body: list[str], comment: str) -> str:
    """A module defining `kernel(params)`; `body` lines are indented by the caller's
    nesting with 4-space steps relative to the function body."""
    lines = [f"# {comment}", HEADER.rstrip("\n"), "", "",
             "@cuda.jit(cache=True)", f"def kernel({', '.join(params)}):"]
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"


def indent(lines: list[str], levels: int = 1) -> list[str]:
    return ["    " * levels + line for line in lines]
