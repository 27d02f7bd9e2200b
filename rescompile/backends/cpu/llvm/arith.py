"""LLVM vectors as the values of the shared formulas (`ops/norm.py`): + - * / on them emit the
IR instructions, `muladd` fuses (`Function.fma`), so a kernel computes an op's arithmetic as
the op defines it instead of restating it."""

from __future__ import annotations

from .emit import Function


class Vec:
    """One IR value (a vector of the kernel's dtype) of a Function."""

    def __init__(self, f: Function, value):
        self.f, self.value = f, value

    def _emit(self, build, other: Vec) -> Vec:
        return Vec(self.f, build(self.value, other.value))

    def __add__(self, other: Vec) -> Vec:
        return self._emit(self.f.b.fadd, other)

    def __sub__(self, other: Vec) -> Vec:
        return self._emit(self.f.b.fsub, other)

    def __mul__(self, other: Vec) -> Vec:
        return self._emit(self.f.b.fmul, other)

    def __truediv__(self, other: Vec) -> Vec:
        return self._emit(self.f.b.fdiv, other)


class VectorArithmetic:
    """The arithmetic `m` of `ops/norm.py` for one Function's vectors."""

    def __init__(self, f: Function):
        self.f = f

    def values(self, *values) -> list[Vec]:
        return [Vec(self.f, v) for v in values]

    def const(self, value: float) -> Vec:
        return Vec(self.f, self.f.vconst(value))

    def sqrt(self, x: Vec) -> Vec:
        return Vec(self.f, self.f.unary("sqrt", x.value))

    def muladd(self, a: Vec, b: Vec, c: Vec) -> Vec:
        return Vec(self.f, self.f.fma(a.value, b.value, c.value))

    @staticmethod
    def let(x: Vec) -> Vec:
        return x  # an IR value is computed once already
