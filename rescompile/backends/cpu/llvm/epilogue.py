"""The epilogue vocabulary of every CPU kernel: one rule per IR epilogue step, keyed by the
step's op name (`ops/fused.EPILOGUE_OPS`), applied to a vector of the running value.

A rule says what the step reads besides the value, in the order of the step's `args`: a
per-channel vector ("channel": bias, scale, gamma, ...) or a tensor of the value's own shape
("pixel": the residual of an add); and which of the step's attributes it reads at run time
("scalars": relu's alpha, batch_normalize's epsilon). Kernels take those operands as run-time
arguments, so one compiled kernel serves every layer whose epilogue has the same steps.

The arithmetic is each op's reference (`ops/`), written on vectors:
- bias_add:  v + bias
- affine:    v * scale + shift
- relu:      v < 0 ? v * alpha : v   (NaN is not < 0, so it passes through, as in the reference)
- add:       v + other
- batch_normalize: ops/norm.py bn_apply, on vectors (arith.py)
- relu_grad: x < 0 ? v * alpha : v   (v is the gradient, x the relu's input)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ....ops import norm
from .arith import VectorArithmetic


@dataclass(frozen=True)
class Rule:
    operands: tuple[str, ...]  # "channel" or "pixel", one per arg of the step
    scalars: tuple[str, ...]
    apply: Callable  # (Function, value, operand vectors, scalar vectors) -> value


def _relu(f, v, operands, scalars):
    (alpha,) = scalars
    negative = f.b.fcmp_ordered("<", v, f.vconst(0.0))
    return f.b.select(negative, f.b.fmul(v, alpha), v)


def _relu_grad(f, v, operands, scalars):
    (x,), (alpha,) = operands, scalars
    negative = f.b.fcmp_ordered("<", x, f.vconst(0.0))
    return f.b.select(negative, f.b.fmul(v, alpha), v)


def _normalize(f, v, operands, scalars):
    m = VectorArithmetic(f)
    x, gamma, beta, mean, var, epsilon = m.values(v, *operands, *scalars)
    return norm.bn_apply(m, x, gamma, beta, mean, var, epsilon).value


RULES = {
    "bias_add": Rule(("channel",), (), lambda f, v, o, s: f.b.fadd(v, o[0])),
    "affine": Rule(("channel", "channel"), (), lambda f, v, o, s: f.fma(v, o[0], o[1])),
    "relu": Rule((), ("alpha",), _relu),
    "add": Rule(("pixel",), (), lambda f, v, o, s: f.b.fadd(v, o[0])),
    "batch_normalize": Rule(("channel",) * 4, ("epsilon",), _normalize),
    "relu_grad": Rule(("pixel",), ("alpha",), _relu_grad),
}


def rule(op: str) -> Rule:
    if op not in RULES:
        raise ValueError(f"epilogue step {op!r} has no CPU rule; known: {sorted(RULES)}")
    return RULES[op]


@dataclass(frozen=True)
class Operand:
    """One operand of a kernel's epilogue: the step it belongs to and its role."""
    step: int
    kind: str  # "channel" or "pixel"
    position: int  # index among the step's args

    @property
    def name(self) -> str:
        return f"s{self.step}.arg{self.position}"


def operands(steps: tuple[str, ...], first_step: int = 0) -> list[Operand]:
    return [Operand(first_step + i, kind, j) for i, op in enumerate(steps)
            for j, kind in enumerate(rule(op).operands)]


def scalar_names(steps: tuple[str, ...], first_step: int = 0) -> list[str]:
    return [f"s{first_step + i}.{name}" for i, op in enumerate(steps)
            for name in rule(op).scalars]
