"""The epilogue vocabulary of every CPU kernel: one rule per op of kind "epilogue" (`ops/`),
applied to a vector of the running value, and `apply_chain`, which runs a chain of them for
every kernel that has one.

A rule names what the step reads besides the value, in the order of the step's `args`: a
per-channel vector ("channel": bias, scale, gamma, ...), a tensor of the value's own shape
("pixel": the residual of an add), or a tensor read through an average pool over `k` x `k`
blocks and `before` zero channels ("pooled": the seed's shortcut, k and before being the
step's sizes, the tensor's channel count `<role>.channels` a size of its own); which of the
step's attributes it reads at run time as floats ("scalars": relu's alpha, batch_normalize's
epsilon) and as integers ("sizes": add_pooled's k and before). Kernels take those operands as
run-time arguments, named `e<step>.<name>` (`Operand.role`), so one compiled kernel serves
every layer whose epilogue has the same steps. Every kernel reads an operand with
`read_operand` (the conv tile keeps its own row offsets for "pixel" operands).

The arithmetic is each op's reference (`ops/`), written on vectors:
- bias_add:  v + bias
- affine:    v * scale + shift
- relu:      v < 0 ? v * alpha : v   (NaN is not < 0, so it passes through, as in the reference)
- add:       v + other
- add_pooled: v + pooled(shortcut)   (pixels.pooled_vector)
- batch_normalize: ops/norm.py bn_apply, on vectors (arith.py): its per-channel (inv, shift)
  derived from gamma, beta, mean and var (`Rule.derive`), then v * inv + shift
- relu_grad: x < 0 ? v * alpha : v   (v is the gradient, x the relu's input)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ....ops import norm
from . import abi
from .arith import VectorArithmetic
from .pixels import load_vector, offset, pooled_vector


@dataclass(frozen=True)
class Rule:
    operands: tuple[tuple[str, str], ...]  # (name, CHANNEL, PIXEL or POOLED), one per arg
    scalars: tuple[str, ...]
    apply: Callable  # (Function, value, operand vectors, scalar vectors) -> value
    sizes: tuple[str, ...] = ()  # integer attributes, read at run time
    # What the step computes of its per-channel operands alone: (Function, operand vectors,
    # scalar vectors) -> the `derived` vectors `apply` then takes in their place. A kernel
    # may derive them once a call (`Chain.derive`, `pixels.channel_table`), not once a pixel.
    derive: Callable | None = None
    derived: tuple[str, ...] = ()


def _relu(f, v, operands, scalars):
    (alpha,) = scalars
    negative = f.b.fcmp_ordered("<", v, f.vconst(0.0), name="negative")
    return f.b.select(negative, f.b.fmul(v, alpha, name="leak"), v)


def _relu_grad(f, v, operands, scalars):
    (x,), (alpha,) = operands, scalars
    negative = f.b.fcmp_ordered("<", x, f.vconst(0.0), name="negative")
    return f.b.select(negative, f.b.fmul(v, alpha, name="leak"), v)


def _bn_affine(f, operands, scalars):
    m = VectorArithmetic(f)
    return [d.value for d in norm.bn_affine(m, *m.values(*operands, *scalars))]


def _normalize(f, v, derived, scalars):
    m = VectorArithmetic(f)
    return norm.bn_scaled(m, *m.values(v, *derived)).value


def _add(f, v, operands, scalars):
    return f.b.fadd(v, operands[0])


CHANNEL, PIXEL, POOLED = "channel", "pixel", "pooled"
RULES = {
    "bias_add": Rule((("bias", CHANNEL),), (), lambda f, v, o, s: f.b.fadd(v, o[0])),
    "affine": Rule((("scale", CHANNEL), ("shift", CHANNEL)), (),
                   lambda f, v, o, s: f.fma(v, o[0], o[1])),
    "relu": Rule((), ("alpha",), _relu),
    "add": Rule((("other", PIXEL),), (), _add),
    "add_pooled": Rule((("shortcut", POOLED),), (), _add, sizes=("k", "before")),
    "batch_normalize": Rule(tuple((n, CHANNEL) for n in ("gamma", "beta", "mean", "var")),
                            ("epsilon",), _normalize, derive=_bn_affine,
                            derived=("inv", "shift")),
    "relu_grad": Rule((("x", PIXEL),), ("alpha",), _relu_grad),
}


def rule(op: str) -> Rule:
    if op not in RULES:
        raise ValueError(f"epilogue step {op!r} has no CPU rule; known: {sorted(RULES)}")
    return RULES[op]


@dataclass(frozen=True)
class Operand:
    """One operand of a kernel's epilogue: the step it belongs to and its name there."""
    step: int
    name: str
    kind: str  # CHANNEL or PIXEL
    position: int  # index among the step's args

    @property
    def role(self) -> str:
        return f"e{self.step}.{self.name}"


def scalar_field(step: int, name: str) -> str:
    return f"e{step}.{name}"


def read_operand(f, o: Operand, v: dict, ptr: dict, at, c, mask):
    """Operand `o`'s vector of channels from c (at pixel `at` = (n, oh, ow) of the output),
    from the kernel's fields `v` and pointers `ptr`."""
    if o.kind == CHANNEL:
        return load_vector(f, f.element(ptr[o.role], c), mask, name=o.role)
    if o.kind == PIXEL:
        where = f.b.add(offset(f, v, o.role, *at), c, name=f"{o.role}.at")
        return load_vector(f, f.element(ptr[o.role], where), mask, name=o.role)
    return pooled_vector(f, v, o.role, ptr[o.role], v[scalar_field(o.step, "k")],
                         v[scalar_field(o.step, "before")], v[f"{o.role}.channels"], at, c,
                         mask, name=o.role)


def channel_operands(f, chain, ptr: dict, c, mask) -> dict:
    """The vector of channels from c of each of the chain's operands (all per-channel ones:
    a prologue's), by role."""
    return {o.role: load_vector(f, f.element(ptr[o.role], c), mask, name=o.role)
            for o in chain.operands}


@dataclass(frozen=True)
class Chain:
    """Epilogue steps (op names), numbered from `first` in the kernel that runs them."""
    steps: tuple[str, ...]
    first: int = 0

    def __post_init__(self):
        for op in self.steps:
            rule(op)

    @property
    def end(self) -> int:
        return self.first + len(self.steps)

    def numbered(self):
        return enumerate(self.steps, start=self.first)

    @property
    def operands(self) -> list[Operand]:
        return [Operand(i, name, kind, j) for i, op in self.numbered()
                for j, (name, kind) in enumerate(rule(op).operands)]

    @property
    def pixel_roles(self) -> list[str]:
        return [o.role for o in self.operands if o.kind == PIXEL]

    @property
    def pooled_roles(self) -> list[str]:
        return [o.role for o in self.operands if o.kind == POOLED]

    @property
    def derived_names(self) -> tuple[str, ...]:
        """The per-channel vectors its steps derive (`Rule.derive`): e<step>.<name>."""
        return tuple(scalar_field(i, n) for i, op in self.numbered() for n in rule(op).derived)

    def derive(self, f, operand, scalars: dict) -> dict:
        """Those vectors at one vector of channels, by name, `operand(Operand)` giving each
        per-channel operand's vector there and `scalars` each scalar field's."""
        derived = {}
        for index, op in self.numbered():
            r = rule(op)
            if r.derive is not None:
                values = r.derive(f, [operand(o) for o in self.operands if o.step == index],
                                  _scalars(r, index, scalars))
                derived.update(zip((scalar_field(index, n) for n in r.derived), values))
        return derived

    def signature(self, kernel) -> abi.Signature:
        """Its operands' pointers (of the types `kernel` stores them in), the strides of its
        pixel and pooled operands, its scalars and sizes, and each pooled operand's channel
        count."""
        return (abi.stored(kernel, *[o.role for o in self.operands])
                + abi.strides(*self.pixel_roles, *self.pooled_roles)
                + abi.scalars(*[scalar_field(i, s) for i, op in self.numbered()
                                for s in rule(op).scalars])
                + abi.sizes(*[scalar_field(i, s) for i, op in self.numbered()
                              for s in rule(op).sizes],
                            *[f"{role}.channels" for role in self.pooled_roles]))

    def arguments(self, steps: list[dict], inputs: list[str], channels_of: Callable):
        """What a node's epilogue `steps` (whose args index `inputs`) give this chain's
        signature: pointer role -> value, strided role -> tensor, scalar field -> float,
        size field -> int (`channels_of(value)`: a pooled operand's channel count)."""
        uses, tensors, fields = {}, {}, {}
        for operand in self.operands:
            value = inputs[steps[operand.step - self.first]["args"][operand.position]]
            uses[operand.role] = value
            if operand.kind != CHANNEL:
                tensors[operand.role] = value
            if operand.kind == POOLED:
                fields[f"{operand.role}.channels"] = channels_of(value)
        for i, op in self.numbered():
            step = steps[i - self.first]
            fields.update({scalar_field(i, n): float(step[n]) for n in rule(op).scalars})
            fields.update({scalar_field(i, n): int(step[n]) for n in rule(op).sizes})
        return uses, tensors, fields


class Chained:
    """A kernel whose output is its value through the `epilogue` chain and, when `out2` is not
    None, whose second output is that output through the `out2` chain."""
    out2 = None

    @property
    def chains(self) -> list[Chain]:
        first = Chain(tuple(self.epilogue))
        return [first] + ([Chain(tuple(self.out2), first.end)] if self.out2 is not None
                          else [])

    @property
    def outputs(self) -> list[str]:
        return ["out", "out2"][:len(self.chains)]

    def chain_name(self, empty: str) -> str:
        """The chains in a kernel symbol: `bias_add_relu`, `add__out2_affine_relu`."""
        name = "_".join(self.epilogue) or empty
        return name + ("__out2_" + "_".join(self.out2) if self.out2 is not None else "")


def apply_chain(f, chain: Chain, value, operand, scalars: dict, suffix: str = "",
                derived: dict | None = None):
    """`value` through the chain's steps: `operand(Operand)` gives each operand's vector,
    `scalars` each scalar field's, `derived` (by name) the vectors `Chain.derive` made of
    them, where the kernel made them already; each step's result is named after it (plus
    `suffix`)."""
    for index, op in chain.numbered():
        f.b.comment(f"epilogue step {index}: {op}{suffix}")
        r, step_scalars = rule(op), _scalars(rule(op), index, scalars)
        if r.derive is not None and derived is not None:
            operands = [derived[scalar_field(index, n)] for n in r.derived]
        else:
            operands = [operand(o) for o in chain.operands if o.step == index]
            if r.derive is not None:
                operands = r.derive(f, operands, step_scalars)
        value = r.apply(f, value, operands, step_scalars)
        value.name = f"{op}{index}{suffix}"
    return value


def _scalars(r: Rule, index: int, scalars: dict) -> list:
    return [scalars[scalar_field(index, s)] for s in r.scalars]


def chain_of(steps) -> tuple[str, ...]:
    """The op names of a node's epilogue steps (None for none)."""
    return tuple(step["op"] for step in steps or ())
