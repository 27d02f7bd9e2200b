"""Per-element arithmetic of every elementwise op, as CUDA source expressions.

Each rule transcribes its op's NumPy reference in `rescompile/ops/` (named beside it) into
statements on scalars, with every literal cast to the model dtype as the reference does
(`x.dtype.type(alpha)`). Elementwise kernels, fused epilogues and the fused optimizer update
all emit their arithmetic through this one table, so an op's meaning is written once here.

A rule gets an Emitter, the node's attrs and one scalar expression per input, and returns one
expression per output.
"""

from __future__ import annotations

from ...ops import norm
from ...ops.fused import step_attrs
from ...ops.update import moving_rate


def literal(dtype: str, value) -> str:
    """A constant as source: cast to the dtype, as the references cast (`x.dtype.type(v)`)."""
    return f"np.{dtype}({float(value)!r})"


class Emitter:
    """Collects statements; `let` names an intermediate, `c` casts a literal to the dtype."""

    def __init__(self, dtype: str, prefix: str = "t"):
        self.dt = f"np.{dtype}"
        self.dtype = dtype
        self.lines: list[str] = []
        self.prefix = prefix
        self.count = 0

    def let(self, expr: str) -> str:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def c(self, value) -> str:
        return literal(self.dtype, value)

    def arithmetic(self, dtype: str | None = None) -> "Arithmetic":
        return Arithmetic(self, dtype or self.dtype)


class Expr:
    """A scalar source expression on which + - * / write source text: the values the shared
    formulas of `ops/` compute with here. Parenthesised where Python's precedence and
    left-to-right evaluation need it, so the text evaluates in the formula's order."""
    PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
    ATOM = 3

    def __init__(self, text: str, precedence: int = ATOM):
        self.text, self.precedence = text, precedence

    def __str__(self) -> str:
        return self.text

    def _binary(self, op: str, other: "Expr") -> "Expr":
        level = self.PRECEDENCE[op]
        left = self.text if self.precedence >= level else f"({self.text})"
        right = other.text if other.precedence > level else f"({other.text})"
        return Expr(f"{left} {op} {right}", level)

    def __add__(self, other): return self._binary("+", other)
    def __sub__(self, other): return self._binary("-", other)
    def __mul__(self, other): return self._binary("*", other)
    def __truediv__(self, other): return self._binary("/", other)


class Arithmetic:
    """The arithmetic of `ops/norm.py`'s formulas on Exprs of one dtype; `let` names a value
    with one of the emitter's statements."""

    def __init__(self, e: Emitter, dtype: str):
        self.e, self.dtype, self.dt = e, dtype, f"np.{dtype}"

    def values(self, *texts: str) -> list[Expr]:
        return [Expr(t) for t in texts]

    def const(self, value) -> Expr:
        return Expr(literal(self.dtype, value))

    def sqrt(self, value: Expr) -> Expr:
        return Expr(f"{self.dt}(math.sqrt({value}))")

    def muladd(self, a: Expr, b: Expr, c: Expr) -> Expr:
        return a * b + c

    def let(self, value: Expr) -> Expr:
        return Expr(self.e.let(str(value)))


RULES = {}


def rule(op):
    def register(fn):
        RULES[op] = fn
        return fn
    return register


@rule("relu")  # ops/elementwise.py leaky_relu
def _relu(e, a, x):
    return [e.let(f"{x} * {e.c(a['alpha'])} if {x} < 0 else {x}")]


@rule("relu_grad")  # ops/elementwise.py leaky_relu_grad
def _relu_grad(e, a, dy, x):
    return [e.let(f"{dy} * {e.c(a['alpha'])} if {x} < 0 else {dy}")]


@rule("add")
@rule("add_pooled")  # ops/fused.py: the kernel reads `y` through its pool (cuda/pool.py)
def _add(e, a, x, y):
    return [e.let(f"{x} + {y}")]


@rule("bias_add")  # ops/fused.py
def _bias_add(e, a, x, b):
    return [e.let(f"{x} + {b}")]


@rule("affine")  # ops/norm.py
def _affine(e, a, x, scale, shift):
    return [e.let(f"{x} * {scale} + {shift}")]


@rule("batch_norm")  # ops/norm.py normalize (either mode, given the statistics)
@rule("batch_normalize")  # ops/fused_train.py: the same arithmetic
def _normalize(e, a, x, gamma, beta, mean, var):
    m = e.arithmetic()
    y = norm.bn_apply(m, *m.values(x, gamma, beta, mean, var), m.const(a["epsilon"]))
    return [str(m.let(y))]


def bn_xhat(e, a, x, mean, var) -> tuple[Expr, Expr]:
    """ops/norm.py bn_grad_reference: inv_std, and xhat = (x - mean) * inv_std."""
    m = e.arithmetic()
    x, mean, var = m.values(x, mean, var)
    inv_std = m.let(norm.bn_inv_std(m, var, m.const(a["epsilon"]), m.const(1)))
    return inv_std, m.let(norm.bn_xhat(x, mean, inv_std))


def bn_relu_dy(e, a, dr, x, gamma, beta, mean, var) -> str:
    """ops/fused_train.py _bn_relu_grad_ref: relu_grad of dr at the recomputed normalize."""
    (y,) = _normalize(e, a, x, gamma, beta, mean, var)
    return _relu_grad(e, a, dr, y)[0]


def _bn_dx(e, a, dy, x, gamma, mean, var, dgamma, dbeta):
    m = e.arithmetic()
    inv_std, xhat = bn_xhat(e, a, x, mean, var)
    dy, gamma, dgamma, dbeta = m.values(dy, gamma, dgamma, dbeta)
    count = m.const(a["count"])
    dx = norm.bn_dx(dy, xhat, norm.bn_dx_scale(gamma, inv_std, count), count, dgamma, dbeta)
    return [str(m.let(dx))]


@rule("batch_norm_grad")  # ops/norm.py bn_grad_reference, dx given dgamma and dbeta
def _bn_grad(e, a, dy, x, gamma, mean, var, dgamma, dbeta):
    return _bn_dx(e, a, dy, x, gamma, mean, var, dgamma, dbeta)


@rule("batch_norm_relu_grad")  # ops/fused_train.py, dx given dgamma and dbeta
def _bn_relu_grad(e, a, dr, x, gamma, beta, mean, var, dgamma, dbeta):
    dy = bn_relu_dy(e, a, dr, x, gamma, beta, mean, var)
    return _bn_dx(e, a, dy, x, gamma, mean, var, dgamma, dbeta)


@rule("global_avg_pool_grad")  # ops/pool.py _gap_grad_ref
def _gap_grad(e, a, dy):
    h, w = a["in_hw"]
    return [e.let(f"{dy} / {e.c(h * w)}")]


@rule("l2_penalty_grad")  # ops/update.py
def _l2_grad(e, a, dy, w):
    return [e.let(f"{w} * ({dy} * {e.c(a['scale'])})")]


@rule("momentum_update")  # ops/update.py _momentum_ref
def _momentum(e, a, w, accum, grad, lr):
    new_accum = e.let(f"{accum} * {e.c(a['momentum'])} + {grad}")
    return [e.let(f"{w} - {lr} * {new_accum}"), new_accum]


@rule("nesterov_update")  # ops/update.py _nesterov_ref
def _nesterov(e, a, w, accum, grad, lr):
    momentum = e.c(a["momentum"])
    new_accum = e.let(f"{accum} * {momentum} + {grad}")
    return [e.let(f"{w} - {lr} * ({grad} + {new_accum} * {momentum})"), new_accum]


@rule("smooth_labels")  # ops/head.py _smooth_ref
def _smooth_labels(e, a, labels):
    epsilon = a["epsilon"]
    return [e.let(f"{labels} * {e.c(1 - epsilon)} + {e.c(epsilon / a['classes'])}")]


@rule("sgd_update")
def _sgd(e, a, w, grad, lr):
    return [e.let(f"{w} - {lr} * {grad}")]


def _moving(e, a, moving, batch):
    return e.let(f"{moving} - ({moving} - {batch}) * "
                 f"{e.c(moving_rate(a['decay'], e.dtype))}")


@rule("moving_average")  # ops/update.py _moving_average
def _moving_average(e, a, moving, batch):
    return [_moving(e, a, moving, batch)]


@rule("debiased_moving_average")  # ops/update.py _debiased_ref
def _debiased(e, a, biased, step, batch):
    rate = e.c(moving_rate(a["decay"], e.dtype))
    new_biased = _moving(e, a, biased, batch)
    new_step = e.let(f"{step} + {e.c(1)}")
    factor = e.let(f"{e.c(1)} - ({e.c(1)} - {rate}) ** {new_step}")
    return [new_biased, new_step, e.let(f"{new_biased} / {factor}")]


def _bn_scale_shift(e, a, gamma, beta, mean, var):
    """ops/fused.py bn_scale_shift: in float64."""
    m = e.arithmetic("float64")
    gamma, beta, mean, var = m.values(*(f"np.float64({v})" for v in (gamma, beta, mean, var)))
    scale, shift = norm.bn_affine(m, gamma, beta, mean, var, m.const(a["epsilon"]))
    return scale, m.let(shift)


@rule("bn_affine_params")
def _affine_params(e, a, gamma, beta, mean, var):
    scale, shift = _bn_scale_shift(e, a, gamma, beta, mean, var)
    return [e.let(f"{e.dt}({scale})"), e.let(f"{e.dt}({shift})")]


@rule("fold_bn_weights")
def _fold(e, a, w, gamma, beta, mean, var):
    scale, shift = _bn_scale_shift(e, a, gamma, beta, mean, var)
    return [e.let(f"{e.dt}(np.float64({w}) * {scale})"), e.let(f"{e.dt}({shift})")]


def epilogue(e, steps, value: str, operands: list[str]) -> str:
    """ops/fused.py apply_epilogue: the value flows through each step as its first input."""
    for step in steps:
        (value,) = RULES[step["op"]](e, step_attrs(step), value,
                                     *[operands[i] for i in step["args"]])
    return value


@rule("fused_elementwise")  # ops/fused.py _fused_elementwise_ref
def _fused_elementwise(e, a, x, *rest):
    operands = [x, *rest]
    y = epilogue(e, a["epilogue"], x, operands)  # `stats` outputs: reduce.lower_stats
    return [y, epilogue(e, a["out2"], y, operands)] if a.get("out2") else [y]
