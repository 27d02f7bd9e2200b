"""Per-element arithmetic of every elementwise op, as CUDA source expressions.

Each rule transcribes its op's NumPy reference in `rescompile/ops/` (named beside it) into
statements on scalars, with every literal cast to the model dtype as the reference does
(`x.dtype.type(alpha)`). Elementwise kernels, fused epilogues and the fused optimizer update
all emit their arithmetic through this one table, so an op's meaning is written once here.

A rule gets an Emitter, the node's attrs and one scalar expression per input, and returns one
expression per output.
"""

from __future__ import annotations

from ...ops.fused import step_attrs
from ...ops.update import moving_rate


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
        return f"{self.dt}({float(value)!r})"

    def sqrt(self, expr: str) -> str:
        return f"{self.dt}(math.sqrt({expr}))"


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
    eps = e.c(a["epsilon"])
    inv = e.let(f"{gamma} / {e.sqrt(f'{var} + {eps}')}")
    return [e.let(f"{x} * {inv} + ({beta} - {mean} * {inv})")]


def bn_xhat(e, a, x, mean, var) -> tuple[str, str]:
    """ops/norm.py bn_grad_reference: inv_std = 1 / sqrt(var + eps), xhat = (x - mean) * inv_std."""
    eps = e.c(a["epsilon"])
    inv_std = e.let(f"{e.c(1)} / {e.sqrt(f'{var} + {eps}')}")
    return inv_std, e.let(f"({x} - {mean}) * {inv_std}")


def bn_relu_dy(e, a, dr, x, gamma, beta, mean, var) -> str:
    """ops/fused_train.py _bn_relu_grad_ref: relu_grad of dr at the recomputed normalize."""
    (y,) = _normalize(e, a, x, gamma, beta, mean, var)
    return _relu_grad(e, a, dr, y)[0]


def _bn_dx(e, a, dy, x, gamma, mean, var, dgamma, dbeta):
    count = e.c(a["count"])
    inv_std, xhat = bn_xhat(e, a, x, mean, var)
    return [e.let(f"({gamma} * {inv_std} / {count}) * ({count} * {dy} - {dbeta} - "
                  f"{xhat} * {dgamma})")]


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
    scale = e.let(f"np.float64({gamma}) / math.sqrt(np.float64({var}) + {a['epsilon']!r})")
    return scale, e.let(f"np.float64({beta}) - np.float64({mean}) * {scale}")


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
