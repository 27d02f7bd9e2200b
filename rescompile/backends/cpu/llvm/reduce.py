"""Training's reductions over pixels, as fixed-chunk float64 partial sums (`slots.py`), their
combination, and the batch-norm gradient's elementwise half.

    ChannelSums("moments")       slot += (x, x * x)                      batch_moments
    ChannelSums("bn_grad")       slot += (g, g * xhat), g = dy           batch_norm_grad
    ChannelSums("bn_relu_grad")  slot += (g, g * xhat), g = relu'(bn(x)) * dr
    SlotSum("moments")           mean = S / count, var = Q / count - mean^2
    SlotSum("sums")              the slots' sums, row by row (weight gradients, BN-gradient sums)
    BatchNormGradApply           dx = bn_dx(g, xhat, ...) from the sums

The batch-norm arithmetic is `ops/norm.py`'s, on vectors (arith.py): xhat = bn_xhat, and for
the fused ReLU the normalised value recomputed from x by bn_apply, its gradient the epilogue's
relu_grad rule.
A chunk's pixels are summed in the kernel's dtype over blocks of BLOCK pixels, each block then
added into the float64 slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ....ops import norm
from . import epilogue
from .arith import Vec, VectorArithmetic
from .emit import Function
from .pixels import PixelWalk, channel_vectors, load_vector, offset, store_vector, stride_fields
from .pixelwise import PixelKernel
from .slots import F64, add_f64, statistics_slot

BLOCK = 64  # pixels summed in the kernel's dtype before a float64 add
SUM_KINDS = ("moments", "bn_grad", "bn_relu_grad")


def _channel(f: Function, ptr, names, c, mask) -> dict:
    return {n: load_vector(f, f.element(ptr[n], c), mask) for n in names}


def _inv_std(m: VectorArithmetic, var: Vec, epsilon: Vec) -> Vec:
    return norm.bn_inv_std(m, var, epsilon, m.const(1.0))


def _gradient(m: VectorArithmetic, kind: str, x: Vec, dr: Vec, ch: dict, scalars: dict) -> Vec:
    """g of the batch-norm gradient: dr, or dr through the leaky ReLU of the normalised x."""
    if kind != "bn_relu_grad":
        return dr
    y = norm.bn_apply(m, x, ch["gamma"], ch["beta"], ch["mean"], ch["var"], scalars["epsilon"])
    relu_grad = epilogue.rule("relu_grad").apply
    return Vec(m.f, relu_grad(m.f, dr.value, [y.value], [scalars["alpha"].value]))


def sum_operands(kind: str | None) -> list[str]:
    """What a kind of sums reads besides the summed tensor: the batch norm's input x and its
    per-channel vectors."""
    if kind in (None, "moments"):
        return []
    return ["x", "gamma"] + (["beta"] if kind == "bn_relu_grad" else []) + ["mean", "var"]


def sum_scalars(kind: str | None) -> list[str]:
    return {None: [], "moments": [], "bn_grad": ["epsilon"],
            "bn_relu_grad": ["epsilon", "alpha"]}[kind]


def sum_terms(f: Function, kind: str, value, x, ch: dict, scalars: dict):
    """The two summands at one element: (value, value) for moments (its square is their
    product), (g, xhat) for a batch-norm gradient, `value` being dr there."""
    if kind == "moments":
        return value, value
    m = VectorArithmetic(f)
    x, value = m.values(x, value)
    ch, scalars = _vecs(m, ch), _vecs(m, scalars)
    g = _gradient(m, kind, x, value, ch, scalars)
    xhat = norm.bn_xhat(x, ch["mean"], _inv_std(m, ch["var"], scalars["epsilon"]))
    return g.value, xhat.value


def _vecs(m: VectorArithmetic, values: dict) -> dict:
    return dict(zip(values, m.values(*values.values())))


def _pointers(kind: str) -> list[str]:
    return ["x"] if kind == "moments" else ["dr"] + sum_operands(kind)


def _scalars(kind: str) -> list[str]:
    return sum_scalars(kind)


@dataclass(frozen=True)
class ChannelSums(PixelKernel):
    """Two per-channel sums over the call's pixels into this call's float64 slot."""
    kind: str = "moments"

    def __post_init__(self):
        if self.kind not in SUM_KINDS:
            raise ValueError(f"ChannelSums.kind must be one of {SUM_KINDS}")

    @property
    def symbol(self) -> str:
        return f"sums_{self.kind}_{self.dtype}_{self.target.isa}"

    @property
    def pointers(self) -> list[str]:
        return _pointers(self.kind) + ["partial"]

    @property
    def fields(self) -> list[str]:
        tensors = ["x"] if self.kind == "moments" else ["dr", "x"]
        return (["oh", "ow"] + stride_fields(tensors) + _scalars(self.kind)
                + ["chunk", "width"])

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        slot = statistics_slot(f, ptr["partial"], v["chunk"], v["width"], 2)
        scalars = {n: f.splat(f.from_bits(v[n])) for n in _scalars(self.kind)}
        walk = PixelWalk(f, v["oh"], v["ow"])
        channels = [n for n in _pointers(self.kind) if n not in ("x", "dr")]

        def vector(c, mask):
            ch = _channel(f, ptr, channels, c, mask)
            walk.restart()
            left = None if mask is None else b.sub(f.args["c_end"], c)
            with f.loop(f.args["p_begin"], f.args["p_end"], BLOCK, "block") as start:
                end = b.select(b.icmp_signed("<", b.add(start, f.i64(BLOCK)), f.args["p_end"]),
                               b.add(start, f.i64(BLOCK)), f.args["p_end"])
                first = f.slot(f.vector, "first", f.vconst(0.0))
                second = f.slot(f.vector, "second", f.vconst(0.0))
                with f.loop(start, end, 1, "p"):
                    at = walk.position()
                    x = load_vector(f, f.element(ptr["x"], b.add(offset(f, v, "x", *at), c)),
                                    mask)
                    dr = None if self.kind == "moments" else load_vector(
                        f, f.element(ptr["dr"], b.add(offset(f, v, "dr", *at), c)), mask)
                    g, h = sum_terms(f, self.kind, x if dr is None else dr, x, ch, scalars)
                    f.set(first, b.fadd(f.get(first), g))
                    f.set(second, f.fma(g, h, f.get(second)))
                    walk.advance()
                add_f64(f, slot, 0, c, f.get(first), left)
                add_f64(f, slot, 1, c, f.get(second), left)
        channel_vectors(f, vector)


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
    def pointers(self) -> list[str]:
        return ["partial"] + [f"out{r}" for r in range(self.rows)]

    @property
    def fields(self) -> list[str]:
        return ["slots", "width"] + (["images", "pixels"] if self.mode == "moments" else [])

    def body(self, f: Function, v, ptr) -> None:
        b = f.b
        partial = b.bitcast(ptr["partial"], F64.as_pointer())
        stride = b.mul(v["width"], f.i64(self.rows), name="slot_stride")
        with f.loop(f.args["c_begin"], f.args["c_end"], 1, "c") as c:
            totals = [f.slot(F64, f"total{r}", ir.Constant(F64, 0.0)) for r in range(self.rows)]
            with f.loop(0, v["slots"], 1, "s") as s:
                for r, total in enumerate(totals):
                    at = b.add(b.add(b.mul(s, stride), b.mul(v["width"], f.i64(r))), c)
                    f.set(total, b.fadd(f.get(total), b.load(b.gep(partial, [at]))))
            values = [f.get(t) for t in totals]
            if self.mode == "moments":
                count = b.uitofp(b.mul(v["images"], v["pixels"]), F64)
                mean = b.fdiv(values[0], count)
                values = [mean, b.fsub(b.fdiv(values[1], count), b.fmul(mean, mean))]
            for r, value in enumerate(values):
                if self.dtype == "float32":
                    value = b.fptrunc(value, f.scalar)
                b.store(value, f.element(ptr[f"out{r}"], c))


@dataclass(frozen=True)
class BatchNormGradApply(PixelKernel):
    """dx of batch_norm_grad (relu=False) or batch_norm_relu_grad, from the combined sums;
    with `plus`, plus another gradient of the same tensor (the residual stream's, which the
    schedule adds here instead of in a pass of its own)."""
    relu: bool = True
    plus: bool = False

    @property
    def kind(self) -> str:
        return "bn_relu_grad" if self.relu else "bn_grad"

    @property
    def symbol(self) -> str:
        plus = "_plus" if self.plus else ""
        return f"bngrad_{'relu_' if self.relu else ''}{self.dtype}_{self.target.isa}{plus}"

    @property
    def pointers(self) -> list[str]:
        return _pointers(self.kind) + ["dgamma", "dbeta", "out"] + (["plus"] if self.plus
                                                                     else [])

    @property
    def fields(self) -> list[str]:
        tensors = ["dr", "x", "out"] + (["plus"] if self.plus else [])
        return ["oh", "ow"] + stride_fields(tensors) + _scalars(self.kind) + ["images"]

    def body(self, f: Function, v, ptr) -> None:
        b, m = f.b, VectorArithmetic(f)
        scalars = _vecs(m, {n: f.splat(f.from_bits(v[n])) for n in _scalars(self.kind)})
        count = Vec(f, f.splat(b.uitofp(b.mul(b.mul(v["images"], v["oh"]), v["ow"]),
                                        f.scalar)))
        channels = [n for n in self.pointers if n not in ("x", "dr", "out", "plus")]
        walk = PixelWalk(f, v["oh"], v["ow"])
        with f.loop(f.args["p_begin"], f.args["p_end"], 1, "p"):
            at = walk.position()

            def vector(c, mask):
                ch = _vecs(m, _channel(f, ptr, channels, c, mask))
                inv_std = _inv_std(m, ch["var"], scalars["epsilon"])
                x, dr = m.values(*(load_vector(f, f.element(ptr[t], b.add(
                    offset(f, v, t, *at), c)), mask) for t in ("x", "dr")))
                g = _gradient(m, self.kind, x, dr, ch, scalars)
                xhat = norm.bn_xhat(x, ch["mean"], inv_std)
                dx = norm.bn_dx(g, xhat, ch["gamma"], inv_std, count, ch["dgamma"],
                                ch["dbeta"]).value
                if self.plus:
                    dx = b.fadd(dx, load_vector(f, f.element(ptr["plus"], b.add(
                        offset(f, v, "plus", *at), c)), mask))
                out = f.element(ptr["out"], b.add(offset(f, v, "out", *at), c))
                store_vector(f, dx, out, mask)
            channel_vectors(f, vector)
            walk.advance()
