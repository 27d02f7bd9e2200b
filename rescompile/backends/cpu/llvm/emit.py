"""A thin layer over llvmlite's IRBuilder for writing micro-kernels: named parameters, counted
loops, variables kept in entry-block slots (LLVM's mem2reg turns them into registers), vectors
of the target's width, masked loads and stores for partial vectors.

Every kernel takes its sizes as run-time values: nothing here bakes a shape into the code.

Element types: a kernel computes in its dtype (float32 or float64) and each pointer has the
type its tensor is stored in (`MEMORY_TYPES`). bfloat16 is stored as i16 (llvmlite has no
bfloat type) and computed in float32: every load through a bfloat16 pointer widens (the 16
bits are a float32's high half: a shift), every store narrows to the nearest bfloat16, ties to
even (`narrow`: integer arithmetic, the same bits on every instruction set, NaN kept a NaN).
So a kernel reads and writes any mix of stored types with the same code.
"""

from __future__ import annotations

import contextlib
import functools

import llvmlite.binding as llvm
from llvmlite import ir

from .. import tuning

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()
L1_LOCALITY, L2_LOCALITY = 3, 2  # llvm.prefetch's locality: prefetcht0 (L1), prefetcht1 (L2)
CACHE_LINE = 64  # bytes, on every x86-64
FLOAT_TYPES = {"float32": ir.FloatType(), "float64": ir.DoubleType()}  # compute types
MEMORY_TYPES = {**FLOAT_TYPES, "bfloat16": I16}  # stored types, as they sit in memory
CONVERTED_LANES = 16  # float32 lanes vcvtneps2bf16 narrows (a zmm register)
FPCLASS_DENORMAL = 0x20  # vfpclassps's test for a denormal, either sign
CHECKED, FAST, EXACT = "checked", "fast", "exact"  # how `narrow` rounds (`rounded_once`)
MXCSR_FTZ, MXCSR_DAZ = 1 << 15, 1 << 6  # flush-to-zero, denormals-are-zero
BF16 = "bfloat16"


def _suffix(typ: ir.Type) -> str:
    """An intrinsic's name part for a scalar type: f32, f64, i16, ..."""
    if isinstance(typ, ir.FloatType):
        return "f32"
    if isinstance(typ, ir.DoubleType):
        return "f64"
    return f"i{typ.width}"


class Vectors:
    """Base of the kernel signatures (frozen dataclasses with `dtype` and `target` fields,
    and `storage`): how many elements one vector register holds, and the element type of each
    pointer role (`storage`: (role, type) where a role's tensor is stored in another type
    than the kernel's dtype, its compute type)."""
    storage: tuple[tuple[str, str], ...] = ()

    @property
    def lanes(self) -> int:
        return self.target.lanes(self.dtype)

    def element(self, role: str) -> str:
        return dict(self.storage).get(role, self.dtype)

    def storage_tag(self) -> str:
        """A symbol's part for the stored types, one letter per pointer (b bfloat16, f
        float32, d float64); empty when every tensor is of the compute type."""
        if not self.storage:
            return ""
        letters = {"bfloat16": "b", "float32": "f", "float64": "d"}
        return "_io" + "".join(letters[p.dtype] for p in self.signature.pointers)


class Tiled(Vectors):
    """A register tile of `mr` rows by `nv` vectors: `nr` output channels."""

    @property
    def nr(self) -> int:
        return self.nv * self.lanes

    @property
    def widens(self) -> bool:
        """Whether the k loop widens its broadcast input, "x" (`tuning.widens`)."""
        return tuning.widens(self.element("x"), self.dtype, getattr(self, "dot", "fma"))


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
        self.features = ""  # the function's own target features (`require`)
        self.converts_bf16 = False  # narrows by vcvtneps2bf16 (`convert_bf16`)
        self._rounding, self._suspects = CHECKED, None  # `rounded_once`'s state
        self._call_probes = None  # `checks_by_call`'s, by the suspects' type
        self._caller_mxcsr = None  # where `flush_denormals` keeps the caller's MXCSR
        self.masks_words = False  # the target moves 16-bit words under a mask (`in_pairs`)
        self._prefixes = {}  # each `mask`'s (first lane, width)

    def require(self, features: str) -> None:
        """Give this function its own target features (an LLVM "target-features" attribute),
        merged with those required before: a kernel using instructions beyond the code
        generator's CPU (vdpbf16ps, AMX) is then compiled for them, never aborting code
        generation (NUMBA-NOTES)."""
        # llvmlite's attribute set lists only keyword attributes; a string one is added as is
        attribute = '"target-features"="{}"'
        set.discard(self.fn.attributes, attribute.format(self.features))
        self.features = ",".join(dict.fromkeys(f for f in f"{self.features},{features}"
                                               .split(",") if f))
        set.add(self.fn.attributes, attribute.format(self.features))

    def convert_bf16(self, features: str) -> None:
        """Narrow float32 vectors of 16 lanes to bfloat16 by vcvtneps2bf16 (`narrow`), with
        the AVX512-BF16 `features` it needs."""
        self.require(features)
        self.converts_bf16 = True

    def intrinsic(self, name: str, ret, params):
        """The declaration of the LLVM intrinsic `name` (declared once per module)."""
        existing = self.module.globals.get(name)
        if existing is not None:
            return existing
        return ir.Function(self.module, ir.FunctionType(ret, params), name)

    def prefetch(self, address, locality: int) -> None:
        """A read prefetch of the cache line at `address` (any pointer; one past the end of an
        array is harmless: a prefetch never faults), into L1 or L2 (`L1_LOCALITY`,
        `L2_LOCALITY`)."""
        fn = self.intrinsic("llvm.prefetch.p0i8", VOID, [I8.as_pointer(), I32, I32, I32])
        self.b.call(fn, [self.b.bitcast(address, I8.as_pointer()), ir.Constant(I32, 0),
                         ir.Constant(I32, locality), ir.Constant(I32, 1)])

    def flush_denormals(self) -> None:
        """From here to the function's end, arithmetic flushes denormals to zero, in and out
        (MXCSR's DAZ and FTZ; `finish` gives the caller its MXCSR back). Then no float32
        result is a denormal, and vcvtneps2bf16 rounds every one exactly: `rounded_once`
        checks none of them."""
        b = self.b
        self._caller_mxcsr = self.slot(I32, "caller_mxcsr")
        kept = self.slot(I32, "mxcsr")
        save = self.intrinsic("llvm.x86.sse.stmxcsr", VOID, [I8.as_pointer()])
        load = self.intrinsic("llvm.x86.sse.ldmxcsr", VOID, [I8.as_pointer()])
        b.call(save, [b.bitcast(self._caller_mxcsr, I8.as_pointer())])
        flushing = b.or_(self.get(self._caller_mxcsr), ir.Constant(I32, MXCSR_FTZ | MXCSR_DAZ))
        self.set(kept, flushing)
        b.call(load, [b.bitcast(kept, I8.as_pointer())])

    def finish(self) -> None:
        """Close the function: the entry block (slots only) falls through to the body."""
        if self._caller_mxcsr is not None:
            load = self.intrinsic("llvm.x86.sse.ldmxcsr", VOID, [I8.as_pointer()])
            self.b.call(load, [self.b.bitcast(self._caller_mxcsr, I8.as_pointer())])
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
        """Address of element `offset` of a pointer (named after the pointer)."""
        return self.b.gep(ptr, [self._as_i64(offset)], name=name or f"{ptr.name or 'ptr'}+")

    def vptr(self, ptr, lanes: int | None = None):
        """`ptr` as a pointer to a vector of its elements (of `lanes`, the function's by
        default)."""
        vec = ir.VectorType(ptr.type.pointee, lanes or self.lanes)
        return self.b.bitcast(ptr, vec.as_pointer(), name=f"{ptr.name or 'at'}.vector")

    def vload(self, ptr, align: int | None = None, name: str = ""):
        """A vector of the compute type from `lanes` elements at `ptr` (widened if stored
        narrower)."""
        raw = self.load_bits(ptr, align=align,
                             name=f"{name}.stored" if self.narrow_at(ptr) and name else name)
        return self.widen(raw, name) if self.narrow_at(ptr) else raw

    def load_bits(self, ptr, mask=None, lanes: int | None = None, align: int | None = None,
                  name: str = ""):
        """`lanes` elements at `ptr` (the function's vector by default, else the mask's) as
        they are stored, bfloat16 as its i16 bits; zero where `mask` is off."""
        at = self.vptr(ptr, lanes or (mask.type.count if mask is not None else self.lanes))
        if mask is None:
            return self.b.load(at, align=align or self.bytes_of(ptr), name=name)
        vec = at.type.pointee
        return self.b.call(self._masked("load", vec), [at, ir.Constant(I32, self.bytes_of(ptr)),
                                                       mask, ir.Constant(vec, None)], name=name)

    def paired(self, first, second, name: str = ""):
        """Two vectors of bfloat16 bits as one of their lanes' pairs, i32 lanes with the first's
        word low: what vdpbf16ps multiplies (each pair's products summed)."""
        count = first.type.count
        order = [lane for i in range(count) for lane in (i, count + i)]
        words = self.b.shuffle_vector(first, second, ir.Constant(ir.VectorType(I32, 2 * count),
                                                                  order))
        return self.b.bitcast(words, ir.VectorType(I32, count), name=name)

    def vstore(self, value, ptr, align: int | None = None) -> None:
        """Store a vector of the compute type as `ptr`'s elements (narrowed, rounded to
        nearest even, if stored narrower; `value` may be `stored_form` already, and of any
        number of lanes)."""
        value = self.stored_form(value, ptr)
        self.b.store(value, self.vptr(ptr, value.type.count),
                     align=align or self.bytes_of(ptr))

    def stream_store(self, value, ptr) -> None:
        """`vstore` past the caches (a non-temporal store: no read of the line it fills);
        `ptr` must sit on the value's size (`on_vector`), which the instruction needs. (LLVM
        22 stores vcvtneps2bf16's results through the caches whatever the hint: it folds
        their cast to i16 into the store, of a type it has no non-temporal store for.)"""
        value = self.stored_form(value, ptr)
        store = self.b.store(value, self.vptr(ptr, value.type.count),
                             align=value.type.count * self.bytes_of(ptr))
        store.set_metadata("nontemporal", self.b.module.add_metadata([ir.Constant(I32, 1)]))

    def joined(self, vectors):
        """One vector of the lanes of `vectors` (one, or two of a type), in order."""
        if len(vectors) == 1:
            return vectors[0]
        lanes = 2 * vectors[0].type.count
        return self.b.shuffle_vector(*vectors, ir.Constant(ir.VectorType(I32, lanes),
                                                           list(range(lanes))), name="joined")

    def on_vector(self, ptr, lanes: int | None = None):
        """Whether `ptr` sits on the size of a vector of `lanes` of its elements (the
        function's by default; an i1), as `stream_store` needs."""
        size = (lanes or self.lanes) * self.bytes_of(ptr)
        low = self.b.and_(self.b.ptrtoint(ptr, I64), self.i64(size - 1))
        return self.b.icmp_unsigned("==", low, self.i64(0), name=f"{ptr.name}.on_vector")

    def store_fence(self) -> None:
        """Order this thread's non-temporal stores before its later stores (sfence): the
        barrier after a kernel then publishes them like any other."""
        self.b.call(self.intrinsic("llvm.x86.sse.sfence", VOID, []), [])

    def load_scalar(self, ptr, name: str = ""):
        """One element at `ptr` as a scalar of the compute type."""
        raw = self.b.load(ptr, name=f"{name}.stored" if self.narrow_at(ptr) and name else name)
        if not self.narrow_at(ptr):
            return raw
        wide = self.b.shl(self.b.zext(raw, I32), ir.Constant(I32, 16))
        return self.b.bitcast(wide, self.scalar, name=name)

    def splat_element(self, ptr, name: str = ""):
        """The element at `ptr` in every lane (for a bfloat16 element: the 16 bits broadcast to
        every half of the vector, then each 32-bit lane shifted up by 16, which leaves the bits
        as a float32's high half: no scalar widening, and no register held for a mask)."""
        if not self.narrow_at(ptr):
            return self.splat(self.b.load(ptr, name=f"{name}.scalar"), name=name)
        halves = ir.VectorType(I16, 2 * self.lanes)
        both = self.splat_as(self.b.load(ptr, name=f"{name}.stored"), halves, f"{name}.halves")
        words = self.b.bitcast(both, ir.VectorType(I32, self.lanes))
        high = self.b.shl(words, ir.Constant(words.type, [16] * self.lanes))
        return self.b.bitcast(high, self.vector, name=name)

    @staticmethod
    def narrow_at(ptr) -> bool:
        """Whether `ptr` points at bfloat16 (i16) elements."""
        return ptr.type.pointee == I16

    @staticmethod
    def bytes_of(ptr) -> int:
        pointee = ptr.type.pointee
        return 8 if isinstance(pointee, ir.DoubleType) else 4 if isinstance(
            pointee, ir.FloatType) else pointee.width // 8

    @property
    def scalar_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 8

    # -- bfloat16 -------------------------------------------------------------------------
    def widen(self, raw, name: str = ""):
        """A vector of bfloat16 bits (i16) as float32: the bits are its high half."""
        words = self.b.zext(raw, ir.VectorType(I32, raw.type.count))
        wide = self.b.shl(words, ir.Constant(words.type, [16] * raw.type.count))
        return self.b.bitcast(wide, ir.VectorType(ir.FloatType(), raw.type.count), name=name)

    def narrow(self, value):
        """A float32 vector as the nearest bfloat16 bits, ties to even, a NaN as a quiet NaN of
        its sign: what ml_dtypes' (and so the reference backend's) rounding gives, the same
        bits on every instruction set. Inside `rounded_once`, the fast rounding, checked
        there; elsewhere exact on its own: by vcvtneps2bf16 where the function
        `converts_bf16` (a vector holding a denormal, which it flushes to zero, takes a rare
        branch to the integer arithmetic), else by `narrow_bits`."""
        if self._rounding == EXACT:
            return self.narrow_bits(value)
        if self._rounding == FAST:
            return self._narrow_fast(value)
        if not self._converts(value):
            return self.narrow_bits(value)
        b = self.b
        converted, denormal = self._convert(value)
        before = b.block
        with b.if_then(self._any([denormal]), likely=False):
            exact = self.narrow_bits(value)
            exact_from = b.block
        bits = b.phi(converted.type, name="bf16")
        bits.add_incoming(converted, before)
        bits.add_incoming(exact, exact_from)
        return bits

    def rounded_once(self, compute) -> list:
        """The list of values `compute()` makes, its bfloat16 roundings (`narrow`) made the
        fast way and checked once for all: vcvtneps2bf16 (wrong on a denormal, so checked
        unless the function `flush_denormals`) where the function `converts_bf16`, else the
        integer rounding without its NaN guard (wrong on a NaN). Where any rounded vector held
        such a value, a rare branch makes every value again by `narrow_bits` (in a function
        that `checks_by_call`, the call's probe takes the suspects, and the whole call is made
        again). One check for a tile row's vectors in place of one each: the branches cost
        more than the rounding."""
        if self._rounding != CHECKED:  # part of an enclosing batch
            return compute()
        b = self.b
        self._rounding, self._suspects = FAST, []
        try:
            fast = compute()
            suspects = self._suspects
        finally:
            self._rounding, self._suspects = CHECKED, None
        if not suspects:
            return fast
        if self._call_probes is not None:
            self._probe_call(suspects)
            return fast
        suspect = self._any(suspects)
        before = b.block
        self._rounding = EXACT
        try:
            with b.if_then(suspect, likely=False):
                exact = compute()
                exact_from = b.block
        finally:
            self._rounding = CHECKED
        merged = []
        for quick, slow in zip(fast, exact):
            if quick is slow:
                merged.append(quick)
                continue
            value = b.phi(quick.type, name=quick.name)
            value.add_incoming(quick, before)
            value.add_incoming(slow, exact_from)
            merged.append(value)
        return merged

    # -- a call checked once ------------------------------------------------------------
    def checks_by_call(self) -> None:
        """Check the fast roundings of every `rounded_once` batch once for the call: their
        suspects are gathered in a probe of the call's, and where one was suspect the call is
        made again exactly (`call_if_suspect`). Only for a function that may run twice on
        the same arguments: it reads nothing it writes and adds to no running sum. The hot
        path then pays a sum per vector, where a branch per tile row holds across it all that
        its rare branch would make again (ResNet-164's bfloat16 inference on AVX2, Zen 3,
        against float32: 1.08x-1.15x the time checked per row, 1.06x-1.09x per call)."""
        self._call_probes = {}

    def rounds_exactly(self) -> None:
        """Make every rounding of the function by `narrow_bits`: the exact twin of one that
        `checks_by_call`, called from it alone, and rarely."""
        self._rounding = EXACT
        self.fn.linkage = "internal"
        self.fn.attributes.add("noinline")
        self.fn.attributes.add("cold")

    @property
    def suspected(self) -> bool:
        """Whether the call's probe took any suspect (`checks_by_call`)."""
        return bool(self._call_probes)

    def _probe_call(self, suspects) -> None:
        """Gather suspects into the call's probes, variables zeroed on entry: a denormal mask
        or'ed, a value summed (a NaN anywhere makes the sum a NaN)."""
        b = self.b
        for typ in dict.fromkeys(suspect.type for suspect in suspects):
            name = "denormal_probe" if typ.element == I1 else "nan_probe"
            probe = self._call_probes.get(typ)
            if probe is None:
                probe = self._call_probes[typ] = self.slot(typ, name)
                with b.goto_block(self._entry):
                    self.set(probe, ir.Constant(typ, None))
            gather = b.or_ if typ.element == I1 else b.fadd
            batch = functools.reduce(lambda x, y: gather(x, y, name=f"batch_{name}"),
                                     [suspect for suspect in suspects if suspect.type == typ])
            self.set(probe, gather(self.get(probe), batch, name=name))

    def call_if_suspect(self, twin: ir.Function) -> None:
        """Where the call's probe took a suspect, call `twin` (this function made with every
        rounding exact, `rounds_exactly`) on the call's arguments: its stores overwrite
        every fast one."""
        probes = [self.get(probe) for probe in self._call_probes.values()]
        with self.b.if_then(self._any(probes), likely=False):
            self.b.call(twin, list(self.fn.args))

    def _converts(self, value) -> bool:
        return self.converts_bf16 and value.type.count == CONVERTED_LANES

    def _convert(self, value, classify: bool = True):
        """vcvtneps2bf16's bits of `value`, and its lanes that hold a denormal (vfpclassps;
        None unless `classify`)."""
        b, vector = self.b, value.type
        convert = self.intrinsic("llvm.x86.avx512bf16.cvtneps2bf16.512",
                                 ir.VectorType(I16, vector.count), [vector])
        converted = b.call(convert, [value], name="bf16.converted")
        if not classify:
            return converted, None
        fpclass = self.intrinsic("llvm.x86.avx512.fpclass.ps.512",
                                 ir.VectorType(I1, vector.count), [vector, I32])
        return converted, b.call(fpclass, [value, ir.Constant(I32, FPCLASS_DENORMAL)],
                                 name="denormal")

    def _narrow_fast(self, value):
        """`narrow`'s fast way, its suspect lanes kept for `rounded_once`'s check: a denormal
        mask, or the value itself (a NaN anywhere makes the check's sum a NaN)."""
        if self._converts(value):
            bits, denormal = self._convert(value, classify=self._caller_mxcsr is None)
            if denormal is not None:
                self._suspects.append(denormal)
            return bits
        self._suspects.append(value)
        return self.b.trunc(self._rounded(value), ir.VectorType(I16, value.type.count),
                            name="bf16")

    def _any(self, suspects):
        """Whether any suspect lane is one (an i1): denormal masks or'ed, values summed."""
        b = self.b
        masks = [s for s in suspects if s.type.element == I1]
        values = [s for s in suspects if s.type.element != I1]
        if values:  # a NaN anywhere makes the sum a NaN
            total = functools.reduce(lambda x, y: b.fadd(x, y, name="nan_probe"), values)
            masks.append(b.fcmp_unordered("uno", total, total, name="nan"))
        flags = functools.reduce(lambda x, y: b.or_(x, y, name="suspect"), masks)
        lanes = ir.IntType(flags.type.count)
        return b.icmp_unsigned("!=", b.bitcast(flags, lanes), ir.Constant(lanes, 0),
                               name="any_suspect")

    def narrow_bits(self, value):
        """`narrow` in integer arithmetic."""
        b, n = self.b, value.type.count
        words = ir.VectorType(I32, n)
        high = b.lshr(b.bitcast(value, words), ir.Constant(words, [16] * n), name="high")
        quiet = b.or_(high, ir.Constant(words, [0x40] * n), name="quiet_nan")
        nan = b.fcmp_unordered("uno", value, value, name="nan")
        return b.trunc(b.select(nan, quiet, self._rounded(value)), ir.VectorType(I16, n),
                       name="bf16")

    def _rounded(self, value):
        """The high half of `value`'s bits rounded to nearest even (as i32 lanes): right
        for every value but a NaN, whose payload may carry into its exponent."""
        b, n = self.b, value.type.count
        words = ir.VectorType(I32, n)

        def const(c):
            return ir.Constant(words, [c] * n)
        bits = b.bitcast(value, words, name="bits")
        odd = b.and_(b.lshr(bits, const(16)), const(1), name="odd")
        return b.lshr(b.add(bits, b.add(odd, const(0x7FFF))), const(16), name="rounded")

    def stored_form(self, value, ptr):
        """`value` as `ptr` holds it: its bfloat16 bits for a bfloat16 pointer (rounded once
        here; a value in that form already is left as it is), else itself."""
        if self.narrow_at(ptr) and value.type.element != I16:
            return self.narrow(value)
        return value

    def read_back(self, stored, ptr):
        """A `stored_form` value as the compute type reads it back: what the rest of a kernel
        uses of an output it stores."""
        return self.widen(stored) if self.narrow_at(ptr) else stored

    def mask(self, first_lane: int, width, lanes: int | None = None):
        """Lanes first_lane.. of one vector (of `lanes` lanes, the function's by default) that
        lie below `width` (a run-time count)."""
        vec = ir.VectorType(I64, lanes or self.lanes)
        numbers = ir.Constant(vec, [first_lane + i for i in range(vec.count)])
        mask = self.b.icmp_signed("<", numbers, self.splat_as(width, vec, "width_lanes"),
                                  name=f"mask_from{first_lane}")
        self._prefixes[mask] = (first_lane, width)
        return mask

    def splat_flag(self, flag):
        """An i1 as a vector of i1 lanes."""
        lanes = ir.VectorType(I1, self.lanes)
        return self.b.select(flag, ir.Constant(lanes, [1] * self.lanes),
                             ir.Constant(lanes, [0] * self.lanes))

    def splat_int(self, value, name: str = ""):
        vec = ir.VectorType(I64, self.lanes)
        return self.splat_as(value, vec, name)

    def splat_int32(self, value, name: str = ""):
        return self.splat_as(value, ir.VectorType(I32, self.lanes), name)

    def masked_load(self, ptr, mask, name: str = ""):
        """The lanes of `mask` (as many as it has) from `ptr` on, zero where it is off."""
        if self.in_pairs(ptr, mask):
            return self.widen(self._load_pairs(ptr, mask), name)
        raw = self.load_bits(ptr, mask, name=name)
        return self.widen(raw, name) if self.narrow_at(ptr) else raw

    def masked_store(self, value, ptr, mask) -> None:
        value = self.stored_form(value, ptr)
        if self.in_pairs(ptr, mask):
            self._store_pairs(value, ptr, mask)
            return
        self.b.call(self._masked("store", value.type),
                    [value, self.b.bitcast(ptr, value.type.as_pointer()),
                     ir.Constant(I32, self.bytes_of(ptr)), mask])

    def _masked(self, move: str, vec):
        """llvm.masked.load or llvm.masked.store of `vec`."""
        if move == "load":
            return self._intrinsic("masked.load", vec, [vec.as_pointer(), I32,
                                                        ir.VectorType(I1, vec.count), vec])
        return self._intrinsic("masked.store", VOID, [vec, vec.as_pointer(), I32,
                                                      ir.VectorType(I1, vec.count)])

    # -- bfloat16 words under a mask, in pairs ------------------------------------------------
    def in_pairs(self, ptr, mask) -> bool:
        """Whether a masked move of bfloat16 words goes as 32-bit pairs and one last word:
        where the target has no masked move of words (AVX2, SSE2; AVX-512 has), and the mask
        is a run of lanes below a width (`mask`). LLVM would move each word alone, behind a
        branch of its own: ResNet-164's bfloat16 kernels on AVX2 were 17% larger so, and took
        5-8% longer to generate."""
        return self.narrow_at(ptr) and not self.masks_words and mask in self._prefixes

    def _pairs(self, mask):
        """The pairs wholly under a run `mask` (an i1 a pair), and the index of its last lane
        where that lane is the first of a pair, else -1."""
        b, lanes = self.b, mask.type.count
        first, width = self._prefixes[mask]
        count = b.sub(width, self.i64(first), name="words")
        count = b.select(b.icmp_signed("<", count, self.i64(0)), self.i64(0), count)
        count = b.select(b.icmp_signed(">", count, self.i64(lanes)), self.i64(lanes), count,
                         name="words_stored")
        vec = ir.VectorType(I64, lanes // 2)
        whole = b.icmp_signed("<", ir.Constant(vec, list(range(lanes // 2))),
                              self.splat_as(b.lshr(count, self.i64(1)), vec, "pairs"),
                              name="whole_pairs")
        odd = b.icmp_unsigned("!=", b.and_(count, self.i64(1)), self.i64(0), name="odd_word")
        return whole, b.select(odd, b.sub(count, self.i64(1)), self.i64(-1), name="last_word")

    def _load_pairs(self, ptr, mask):
        """`masked_load`'s words (i16 lanes, zero where the mask is off), in pairs."""
        b, lanes = self.b, mask.type.count
        whole, last = self._pairs(mask)
        vec = ir.VectorType(I32, lanes // 2)
        pairs = b.call(self._masked("load", vec), [b.bitcast(ptr, vec.as_pointer()),
                                                   ir.Constant(I32, 2), whole,
                                                   ir.Constant(vec, None)], name="pairs")
        words = b.bitcast(pairs, ir.VectorType(I16, lanes), name="words")
        before = b.block
        with b.if_then(b.icmp_signed(">=", last, self.i64(0))):
            with_last = b.insert_element(words, b.load(self.element(ptr, last)),
                                         b.trunc(last, I32), name="with_last_word")
            last_from = b.block
        loaded = b.phi(words.type, name="words_loaded")
        loaded.add_incoming(words, before)
        loaded.add_incoming(with_last, last_from)
        return loaded

    def _store_pairs(self, words, ptr, mask) -> None:
        """`masked_store` of bfloat16 words, in pairs."""
        b, lanes = self.b, mask.type.count
        whole, last = self._pairs(mask)
        vec = ir.VectorType(I32, lanes // 2)
        b.call(self._masked("store", vec), [b.bitcast(words, vec),
                                            b.bitcast(ptr, vec.as_pointer()),
                                            ir.Constant(I32, 2), whole])
        with b.if_then(b.icmp_signed(">=", last, self.i64(0))):
            b.store(b.extract_element(words, b.trunc(last, I32)), self.element(ptr, last))

    # -- arithmetic -----------------------------------------------------------------------
    def splat(self, value, name: str = ""):
        return self.splat_as(value, self.vector, name)

    def splat_as(self, value, vec, name: str = ""):
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
        suffix = (f"v{vec.count}{_suffix(vec.element)}" if isinstance(vec, ir.VectorType)
                  else _suffix(vec))
        if name.startswith("masked."):
            suffix += ".p0"
        return self.intrinsic(f"llvm.{name}.{suffix}", ret, params)

    def from_bits(self, bits, name: str = ""):
        """A float64 stored in an i64 word, as a scalar of the kernel's dtype."""
        value = self.b.bitcast(bits, ir.DoubleType(), name=f"{name}.f64" if name else "")
        return value if self.dtype == "float64" else self.b.fptrunc(value, self.scalar,
                                                                       name=name)


def on_line(nbytes: int) -> int:
    """`nbytes` rounded up to whole cache lines."""
    return -(-nbytes // CACHE_LINE) * CACHE_LINE


def new_module(name: str) -> ir.Module:
    module = ir.Module(name=name)
    module.triple = llvm.get_process_triple()
    return module
