"""A thin layer over llvmlite's IRBuilder for writing micro-kernels: named parameters, counted
loops, variables kept in entry-block slots (LLVM's mem2reg turns them into registers), vectors
of the target's width, masked loads and stores for partial vectors.

Every kernel takes its sizes as run-time values: nothing here bakes a shape into the code.
"""

from __future__ import annotations

import contextlib

import llvmlite.binding as llvm
from llvmlite import ir

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()
FLOAT_TYPES = {"float32": ir.FloatType(), "float64": ir.DoubleType()}
_SUFFIX = {"float32": "f32", "float64": "f64"}


class Vectors:
    """Base of the kernel signatures (frozen dataclasses with `dtype` and `target` fields):
    how many elements one vector register holds."""

    @property
    def lanes(self) -> int:
        return self.target.lanes(self.dtype)


class Tiled(Vectors):
    """A register tile of `mr` rows by `nv` vectors: `nr` output channels."""

    @property
    def nr(self) -> int:
        return self.nv * self.lanes


class Function:
    """One function being emitted. `args` maps parameter names to IR values; `b` is the
    builder; scalars and vectors are of `dtype`, vectors `lanes` wide."""

    def __init__(self, module: ir.Module, name: str, params: list[tuple[str, ir.Type]],
                 dtype: str, lanes: int, fma: bool, ret: ir.Type = VOID):
        self.module, self.dtype, self.lanes, self.use_fma = module, dtype, lanes, fma
        self.scalar = FLOAT_TYPES[dtype]
        self.vector = ir.VectorType(self.scalar, lanes)
        self.fn = ir.Function(module, ir.FunctionType(ret, [t for _, t in params]), name)
        self.args = {}
        for (pname, _), arg in zip(params, self.fn.args):
            arg.name = pname
            self.args[pname] = arg
        self._entry = self.fn.append_basic_block("entry")
        self._body = self.fn.append_basic_block("start")
        self.b = ir.IRBuilder(self._body)

    def finish(self) -> None:
        """Close the function: the entry block (slots only) falls through to the body."""
        self.b.ret_void()
        ir.IRBuilder(self._entry).branch(self._body)

    # -- constants and slots -----------------------------------------------------------------
    @staticmethod
    def i64(value: int) -> ir.Constant:
        return ir.Constant(I64, value)

    def fconst(self, value: float) -> ir.Constant:
        return ir.Constant(self.scalar, float(value))

    def vconst(self, value: float) -> ir.Constant:
        return ir.Constant(self.vector, [float(value)] * self.lanes)

    def slot(self, typ: ir.Type, name: str, init=None):
        """A variable: an entry-block alloca, initialised at the current point."""
        with self.b.goto_block(self._entry):
            ptr = self.b.alloca(typ, name=name)
        if init is not None:
            self.b.store(init, ptr)
        return ptr

    def get(self, slot, name: str = ""):
        """A variable's value, named after the variable unless told otherwise."""
        return self.b.load(slot, name=name or slot.name)

    def set(self, slot, value) -> None:
        self.b.store(value, slot)

    # -- control flow ---------------------------------------------------------------------
    @contextlib.contextmanager
    def loop(self, start, stop, step=1, name: str = "i"):
        """`for i in range(start, stop, step)` (step > 0); yields i."""
        with self.runs(start, stop, name) as (index, set_step):
            set_step(self._as_i64(step))
            yield index

    @contextlib.contextmanager
    def runs(self, start, stop, name: str = "run"):
        """`p = start; while p < stop: ...; p += step` where the body sets the step: yields p
        and a function taking the step (an i64, computed in the body)."""
        b = self.b
        before = b.block
        header = self.fn.append_basic_block(f"{name}.loop")
        body = self.fn.append_basic_block(f"{name}.body")
        done = self.fn.append_basic_block(f"{name}.done")
        b.branch(header)
        b.position_at_end(header)
        index = b.phi(I64, name=name)
        index.add_incoming(self._as_i64(start), before)
        b.cbranch(b.icmp_signed("<", index, self._as_i64(stop)), body, done)
        b.position_at_end(body)
        steps = []
        yield index, steps.append
        index.add_incoming(b.add(index, steps[0], name=f"{name}.next"), b.block)
        b.branch(header)
        b.position_at_end(done)

    def _as_i64(self, value):
        return self.i64(value) if isinstance(value, int) else value

    # -- memory ---------------------------------------------------------------------------
    def element(self, ptr, offset, name: str = ""):
        """Address of element `offset` of a `dtype` pointer (named after the pointer)."""
        return self.b.gep(ptr, [self._as_i64(offset)], name=name or f"{ptr.name or 'ptr'}+")

    def vptr(self, ptr):
        return self.b.bitcast(ptr, self.vector.as_pointer(), name=f"{ptr.name or 'at'}.vector")

    def vload(self, ptr, align: int | None = None, name: str = ""):
        return self.b.load(self.vptr(ptr), align=align or self.scalar_bytes, name=name)

    def vstore(self, value, ptr, align: int | None = None) -> None:
        self.b.store(value, self.vptr(ptr), align=align or self.scalar_bytes)

    @property
    def scalar_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 8

    def mask(self, first_lane: int, width):
        """Lanes first_lane.. of one vector that lie below `width` (a run-time count)."""
        lanes = ir.Constant(ir.VectorType(I64, self.lanes),
                            [first_lane + i for i in range(self.lanes)])
        return self.b.icmp_signed("<", lanes, self.splat_int(width, "width_lanes"),
                                  name=f"mask_from{first_lane}")

    def splat_flag(self, flag):
        """An i1 as a vector of i1 lanes."""
        lanes = ir.VectorType(I1, self.lanes)
        return self.b.select(flag, ir.Constant(lanes, [1] * self.lanes),
                             ir.Constant(lanes, [0] * self.lanes))

    def splat_int(self, value, name: str = ""):
        vec = ir.VectorType(I64, self.lanes)
        return self._splat(value, vec, name)

    def masked_load(self, ptr, mask, name: str = ""):
        fn = self._intrinsic("masked.load", self.vector,
                             [self.vector.as_pointer(), I32, mask.type, self.vector])
        return self.b.call(fn, [self.vptr(ptr), ir.Constant(I32, self.scalar_bytes), mask,
                                self.vconst(0.0)], name=name)

    def masked_store(self, value, ptr, mask) -> None:
        fn = self._intrinsic("masked.store", VOID,
                             [self.vector, self.vector.as_pointer(), I32, mask.type])
        self.b.call(fn, [value, self.vptr(ptr), ir.Constant(I32, self.scalar_bytes), mask])

    # -- arithmetic -----------------------------------------------------------------------
    def splat(self, value, name: str = ""):
        return self._splat(value, self.vector, name)

    def _splat(self, value, vec, name: str = ""):
        """`value` in every lane (`name` for the vector, `name.lane0` for the step before)."""
        name = name or f"{value.name or 'value'}.splat"
        one = self.b.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(I32, 0),
                                    name=f"{name}.lane0")
        zeros = ir.Constant(ir.VectorType(I32, vec.count), [0] * vec.count)
        return self.b.shuffle_vector(one, ir.Constant(vec, ir.Undefined), zeros, name=name)

    def fma(self, a, b, c, name: str = ""):
        """a * b + c, fused where the target has FMA (llvm.fmuladd lets LLVM choose
        elsewhere)."""
        fn = self._intrinsic("fma" if self.use_fma else "fmuladd", a.type, [a.type] * 3)
        return self.b.call(fn, [a, b, c], name=name)

    def unary(self, name: str, value):
        """An elementwise LLVM intrinsic of one operand (sqrt, ...)."""
        return self.b.call(self._intrinsic(name, value.type, [value.type]), [value])

    def binary(self, name: str, a, b):
        return self.b.call(self._intrinsic(name, a.type, [a.type, a.type]), [a, b])

    def _intrinsic(self, name: str, ret, params):
        vec = next((t for t in [ret] + params if isinstance(t, ir.VectorType)), ret)
        suffix = (f"v{vec.count}{_SUFFIX[self.dtype]}" if isinstance(vec, ir.VectorType)
                  else _SUFFIX[self.dtype])
        if name.startswith("masked."):
            suffix += ".p0"
        full = f"llvm.{name}.{suffix}"
        existing = self.module.globals.get(full)
        if existing is not None:
            return existing
        return ir.Function(self.module, ir.FunctionType(ret, params), full)

    def from_bits(self, bits, name: str = ""):
        """A float64 stored in an i64 word, as a scalar of the kernel's dtype."""
        value = self.b.bitcast(bits, ir.DoubleType(), name=f"{name}.f64" if name else "")
        return value if self.dtype == "float64" else self.b.fptrunc(value, self.scalar,
                                                                       name=name)


def new_module(name: str) -> ir.Module:
    module = ir.Module(name=name)
    module.triple = llvm.get_process_triple()
    return module
