"""Training's reductions over pixels, as fixed-chunk float64 partial sums (`slots.py`), their
combination, and the batch-norm gradient's elementwise half.

    ChannelSums(batch_moments)              slot += (x, x * x)
    ChannelSums(batch_norm_grad_sums)       slot += (g, g * xhat), g = dy
    ChannelSums(batch_norm_relu_grad_sums)  slot += (g, g * xhat), g = relu'(bn(x)) * dy
    SlotSum("moments")   mean = S / count, var = Q / count - mean^2
    SlotSum("sums")      the slots' sums, row by row (weight gradients, BN-gradient sums)
    BatchNormGradApply   dx = bn_dx(g, xhat, ...) from the sums, then an epilogue chain

A reduction is named by the op it computes (`SUMS`); it reads that op's inputs by role (the
summed tensor first). The batch-norm arithmetic is `ops/norm.py`'s, on vectors (arith.py):
xhat = bn_xhat, and for the fused ReLU the normalised value recomputed from x by bn_apply, its
gradient the epilogue's relu_grad rule; the apply half derives its per-channel factors once a
call (`pixels.channel_table`), not once a pixel. A chunk's pixels are summed in the kernel's
dtype over blocks of SUM_BLOCK pixels, each block then added into the float64 slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ....ops import norm
from ....ops.registry import get
from ..tuning import SUM_BLOCK
from . import abi, epilogue
from .arith import Vec, VectorArithmetic
from .emit import Function
from .pixels import (PixelWalk, channel_table, channel_vectors, load_vector, offset, put_vector,
                     streaming)
from .pixelwise import PixelKernel
from .slots import F64, add_f64, add_summands, statistics_slot


@dataclass(frozen=True)
class SumKind:
    short: str  # in kernel symbols
    scalars: tuple[str, ...]  # the op's attributes the kernel reads
    rows: tuple[str, ...]  # the op's output that each slot row makes, in row order
    combine: str = "sums"  # how SlotSum turns the rows into them: "sums", or "moments"


SUMS = {  # op -> how its two per-channel sums are made
    "batch_moments": SumKind("moments", (), ("mean", "var"), "moments"),
    "batch_norm_grad_sums": SumKind("bn_grad", ("epsilon",), ("dbeta", "dgamma")),
    "batch_norm_relu_grad_sums": SumKind("bn_relu_grad", ("epsilon", "alpha"),
                                         ("dbeta", "dgamma")),
}
MOMENTS = "batch_moments"


def sum_kind(op: str) -> SumKind:
    if op not in SUMS:
        raise ValueError(f"no CPU reduction for op {op!r}; known: {sorted(SUMS)}")
    return SUMS[op]


def sum_operands(op: str) -> list[str]:
    """What a reduction reads besides the summed tensor: its op's other inputs, by role."""
    return list(get(op).inputs[1:])


def _channel(f: Function, ptr, names, c, mask) -> dict:
    return {n: load_vector(f, f.element(ptr[n], c), mask, name=n) for n in names}


def _inv_std(m: VectorArithmetic, var: Vec, epsilon: Vec) -> Vec:
    return norm.bn_inv_std(m, var, epsilon, m.const(1.0))


def _relu_gradient(m: VectorArithmetic, dy: Vec, y: Vec, alpha: Vec) -> Vec:
    """dy through the leaky ReLU of y (the normalised x)."""
    relu_grad = epilogue.rule("relu_grad").apply
    return Vec(m.f, relu_grad(m.f, dy.value, [y.value], [alpha.value]))


def sum_terms(f: Function, op: str, value, x, ch: dict, scalars: dict):
    """The two summands at one element: (value, value) for moments (its square is their
    product), (g, xhat) for a batch-norm gradient, `value` being dy there."""
    if op == MOMENTS:
        return value, value
    m = VectorArithmetic(f)
    x, value = m.values(x, value)
    ch, scalars = _vecs(m, ch), _vecs(m, scalars)
    g = value
    if "alpha" in sum_kind(op).scalars:
        y = norm.bn_apply(m, x, ch["gamma"], ch["beta"], ch["mean"], ch["var"],
                          scalars["epsilon"])
        g = _relu_gradient(m, value, y, scalars["alpha"])
    xhat = norm.bn_xhat(x, ch["mean"], _inv_std(m, ch["var"], scalars["epsilon"]))
    return g.value, xhat.value


def _vecs(m: VectorArithmetic, values: dict) -> dict:
    return dict(zip(values, m.values(*values.values())))


@dataclass(frozen=True)
class ChannelSums(PixelKernel):
    """Two per-channel sums of `op` over the call's pixels into this call's float64 slot."""
    op: str = MOMENTS

    def __post_init__(self):
        sum_kind(self.op)

    @property
    def symbol(self) -> str:
        return (f"sums_{sum_kind(self.op).short}_{self.dtype}_{self.target.isa}"
                f"{self.storage_tag()}")

    @property
    def summed(self) -> str:
        return get(self.op).inputs[0]

    @property
    def signature(self) -> abi.Signature:
        tensors = list(dict.fromkeys([self.summed, "x"]))
        return (abi.sizes("oh", "ow") + abi.strides(*tensors)
                + abi.scalars(*sum_kind(self.op).scalars) + abi.sizes("chunk", "width")
                + abi.stored(self, *get(self.op).inputs)
                + abi.pointers("float64", "partial", written=True))

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        slot = statistics_slot(f, ptr["partial"], v["chunk"], v["width"], 2)
        scalars = {n: v[n] for n in sum_kind(self.op).scalars}
        walk = PixelWalk(f, v["oh"], v["ow"])
        channels = sum_operands(self.op)[1:]  # the per-channel vectors, after x

        def vector(c, mask):
            ch = _channel(f, ptr, channels, c, mask)
            walk.restart()
            left = None if mask is None else b.sub(f.args["c_end"], c, name="lanes_left")
            with f.loop(f.args["p_begin"], f.args["p_end"], SUM_BLOCK, "block") as start:
                end = b.select(b.icmp_signed("<", b.add(start, f.i64(SUM_BLOCK)),
                                             f.args["p_end"]),
                               b.add(start, f.i64(SUM_BLOCK)), f.args["p_end"], name="block_end")
                first = f.slot(f.vector, "first", f.vconst(0.0))
                second = f.slot(f.vector, "second", f.vconst(0.0))
                with f.loop(start, end, 1, "p"):
                    at = walk.position()
                    x = _pixel(f, v, ptr, "x", at, c, mask)
                    summed = x if self.summed == "x" else _pixel(f, v, ptr, self.summed, at, c,
                                                                 mask)
                    add_summands(f, first, second, *sum_terms(f, self.op, summed, x, ch,
                                                              scalars))
                    walk.advance()
                add_f64(f, slot, 0, c, f.get(first), left)
                add_f64(f, slot, 1, c, f.get(second), left)
        channel_vectors(f, vector)


def _pixel(f: Function, v, ptr, tensor: str, at, c, mask):
    where = f.element(ptr[tensor], f.b.add(offset(f, v, tensor, *at), c))
    return load_vector(f, where, mask, name=tensor)


@dataclass(frozen=True)
class SlotSum(PixelKernel):
    """The slots of a [slots][rows][width] float64 buffer summed in slot order, channels
    [c_begin, c_end): as `rows` outputs of the kernel's dtype, or ("moments") as the mean and
    the biased variance of `images * pixels` values."""
    rows: int = 2
    mode: str = "sums"

    @property
    def symbol(self) -> str:
        return f"slotsum_{self.mode}{self.rows}_{self.dtype}_{self.target.isa}"

    @property
    def signature(self) -> abi.Signature:
        counts = abi.sizes("images", "pixels") if self.mode == "moments" else abi.sizes()
        return (abi.sizes("slots", "width") + counts
                + abi.pointers("float64", "partial")
                + abi.pointers(self.dtype, *[f"out{r}" for r in range(self.rows)],
                               written=True))

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        partial = ptr["partial"]
        stride = b.mul(v["width"], f.i64(self.rows), name="slot_stride")
        with f.loop(f.args["c_begin"], f.args["c_end"], 1, "c") as c:
            totals = [f.slot(F64, f"total{r}", ir.Constant(F64, 0.0)) for r in range(self.rows)]
            with f.loop(0, v["slots"], 1, "s") as s:
                for r, total in enumerate(totals):
                    at = b.add(b.add(b.mul(s, stride), b.mul(v["width"], f.i64(r))), c)
                    f.set(total, b.fadd(f.get(total), b.load(b.gep(partial, [at]))))
            values = [f.get(t, f"total{r}") for r, t in enumerate(totals)]
            if self.mode == "moments":
                count = b.uitofp(b.mul(v["images"], v["pixels"]), F64, name="count")
                mean = b.fdiv(values[0], count, name="mean")
                values = [mean, b.fsub(b.fdiv(values[1], count), b.fmul(mean, mean),
                                       name="var")]
            for r, value in enumerate(values):
                if self.dtype == "float32":
                    value = b.fptrunc(value, f.scalar)
                b.store(value, f.element(ptr[f"out{r}"], c))


@dataclass(frozen=True)
class BatchNormGradApply(epilogue.Chained, PixelKernel):
    """dx of a batch-norm gradient's apply half (`op`: batch_norm_grad_apply or
    batch_norm_relu_grad_apply) from its combined sums, then the `epilogue` chain (a gradient
    add, whose operand is the residual stream's other gradient)."""
    op: str = "batch_norm_relu_grad_apply"
    epilogue: tuple[str, ...] = ()

    @property
    def relu(self) -> bool:
        return "beta" in get(self.op).inputs

    @property
    def symbol(self) -> str:
        steps = "".join(f"_{op}" for op in self.epilogue)
        return (f"bngrad_{'relu_' if self.relu else ''}{self.dtype}_{self.target.isa}{steps}"
                f"{self.storage_tag()}")

    @property
    def channels(self) -> list[str]:
        """The op's per-channel inputs (all but x and dy)."""
        return [n for n in get(self.op).inputs if n not in ("x", "dy")]

    @property
    def factors(self) -> tuple[str, ...]:
        """The per-channel vectors the apply reads at every pixel, derived once a call."""
        return ("mean", "dgamma", "dbeta", "inv_std", "scale") + (
            ("inv", "shift") if self.relu else ())

    @property
    def signature(self) -> abi.Signature:
        scalars = ("epsilon", "alpha") if self.relu else ("epsilon",)
        return (abi.sizes("oh", "ow", "images") + abi.placed("streaming")
                + abi.strides("dy", "x", "out")
                + abi.scalars(*scalars) + abi.stored(self, *get(self.op).inputs)
                + abi.stored(self, "out", written=True) + self.chains[0].signature(self))

    def body(self, f: Function, v, ptr) -> None:
        b, m, streams = f.b, VectorArithmetic(f), streaming(f, v)
        scalars = _vecs(m, {n: v[n] for n in ("epsilon", "alpha") if n in v})
        pixels = b.mul(b.mul(v["images"], v["oh"]), v["ow"], name="pixels")
        count = Vec(f, f.splat(b.uitofp(pixels, f.scalar), name="count"))

        def derive(c, mask):
            ch = _vecs(m, _channel(f, ptr, self.channels, c, mask))
            inv_std = _inv_std(m, ch["var"], scalars["epsilon"])
            derived = {"mean": ch["mean"], "dgamma": ch["dgamma"], "dbeta": ch["dbeta"],
                       "inv_std": inv_std,
                       "scale": norm.bn_dx_scale(ch["gamma"], inv_std, count)}
            if self.relu:
                derived["inv"], derived["shift"] = norm.bn_affine(
                    m, ch["gamma"], ch["beta"], ch["mean"], ch["var"], scalars["epsilon"])
            return {name: derived[name].value for name in self.factors}

        def apply(c0, c1, derived):
            walk = PixelWalk(f, v["oh"], v["ow"])
            with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
                at = walk.position()

                def vector(c, mask):
                    ch = _vecs(m, derived(c))
                    x, dy = m.values(*(_pixel(f, v, ptr, t, at, c, mask) for t in ("x", "dy")))
                    g = _relu_gradient(m, dy, norm.bn_scaled(m, x, ch["inv"], ch["shift"]),
                                       scalars["alpha"]) if self.relu else dy
                    xhat = norm.bn_xhat(x, ch["mean"], ch["inv_std"])
                    dx = norm.bn_dx(g, xhat, ch["scale"], count, ch["dgamma"],
                                    ch["dbeta"]).value
                    dx.name = "dx"
                    dx = epilogue.apply_chain(
                        f, self.chains[0], dx,
                        lambda o: epilogue.read_operand(f, o, v, ptr, at, c, mask), v)
                    out = f.element(ptr["out"], b.add(offset(f, v, "out", *at), c))
                    put_vector(f, dx, out, mask, streams)
                channel_vectors(f, vector, c0, c1)
                walk.advance()

        channel_table(f, self.factors, derive, apply)
