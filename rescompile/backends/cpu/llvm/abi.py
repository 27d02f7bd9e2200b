"""A kernel's signature: the typed declaration of its arguments, from which both sides of a
call are made.

Every kernel is called as `fn(consts, ptrs, p_begin, p_end, c_begin, c_end)` (`CALL_PARAMS`):
`consts` points at its fields, one int64 word each in declaration order, `ptrs` at its pointer
arguments, in declaration order. A field is

    size    an integer the step gives (a count, a window's geometry, a chunk length)
    stride  a tensor's stride in elements (image, row or pixel), which the arena computes
            from where the tensor lives; the step names the tensor of each role
    scalar  a float the step gives (an epilogue step's alpha, a batch norm's epsilon), stored
            as float64 bits and read in the kernel's compute type
    placed  an integer the arena gives where it places the step (`PLACED`: whether its
            outputs stream past the caches); a caller without an arena, which measures or
            tests a kernel, gives `placed_values`' defaults

and a pointer has a role (what the step points it at), the element type it points to (the
type its tensor is stored in: the kernel's dtype, bfloat16 for a mixed-precision model's
activations and conv weights, float64 for the slots of a reduction, int64 for the link to
the ranks of a job) and whether the kernel writes it.

The kernel generator loads its arguments from the signature (`load_arguments`), lowering
checks each step against it (`check`): a missing, extra or mistyped field or pointer fails
at lowering, naming the node and the field, not when the arena fills the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ....errors import GraphError
from ..target import Target
from .emit import CONVERTED_LANES, MEMORY_TYPES, I64, Function

CALL_PARAMS = [("consts", I64.as_pointer()), ("ptrs", I64.as_pointer()), ("p_begin", I64),
               ("p_end", I64), ("c_begin", I64), ("c_end", I64)]
FIELD_KINDS = ("size", "stride", "scalar", "placed")
PLACED = {"streaming": 0}  # the placed fields, each with its value off an arena
# What a pointer may point to: a tensor's stored type, or int64 words (the link to the ranks
# of a job, `exchange.py`).
POINTER_TYPES = {**MEMORY_TYPES, "int64": I64}
STRIDES = ("image", "row", "pixel")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # one of FIELD_KINDS


@dataclass(frozen=True)
class Pointer:
    role: str
    dtype: str  # the element type it points to
    written: bool = False


@dataclass(frozen=True)
class Signature:
    fields: tuple[Field, ...]
    pointers: tuple[Pointer, ...]

    def __add__(self, other: Signature) -> Signature:
        return Signature(self.fields + other.fields, self.pointers + other.pointers)

    @property
    def strided(self) -> list[str]:
        """The tensors addressed by strides, in order."""
        return list(dict.fromkeys(f.name.rsplit(".", 1)[0] for f in self.fields
                                  if f.kind == "stride"))

    @property
    def written(self) -> tuple[str, ...]:
        return tuple(p.role for p in self.pointers if p.written)

    def check(self, step) -> None:
        """Fail, naming the node and the field, where `step` does not give what this signature
        declares: every size (an int) and scalar (a float) in `step.fields`, a tensor for each
        strided role in `step.tensors`, and exactly the pointer roles in `step.uses`."""
        where = f"node {step.origin or step.name!r}: kernel {step.kernel.symbol}"
        given = dict(step.fields)
        for f in self.fields:
            if f.kind in ("stride", "placed"):
                continue
            if f.name not in given:
                raise GraphError(f"{where}: no value for {f.kind} field {f.name!r}")
            value = given.pop(f.name)
            if not callable(value) and not _is(f.kind, value):
                raise GraphError(f"{where}: {f.kind} field {f.name!r} is "
                                 f"{type(value).__name__} {value!r}")
        if given:
            raise GraphError(f"{where}: it declares no field {sorted(given)[0]!r}")
        missing = set(self.strided) - set(step.tensors)
        if missing:
            raise GraphError(f"{where}: no tensor for the strides of {sorted(missing)[0]!r}")
        roles = [p.role for p in self.pointers]
        if sorted(roles) != sorted(step.uses):
            extra = sorted(set(step.uses) ^ set(roles))[0]
            raise GraphError(f"{where}: pointer {extra!r} is "
                             f"{'not declared' if extra in step.uses else 'not given'}")


def _is(kind: str, value) -> bool:
    if kind == "size":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, float)


def sizes(*names: str) -> Signature:
    return Signature(tuple(Field(n, "size") for n in names), ())


def strides(*tensors: str) -> Signature:
    return Signature(tuple(Field(f"{t}.{s}", "stride") for t in tensors for s in STRIDES), ())


def placed(*names: str) -> Signature:
    assert set(names) <= set(PLACED), names
    return Signature(tuple(Field(n, "placed") for n in names), ())


def placed_values(signature: Signature, **place) -> dict:
    """The signature's placed fields: where `place` has a function for one (the arena's),
    what it returns, else its default (`PLACED`). A function is called only for a field
    the signature has."""
    return {f.name: int(place[f.name]()) if f.name in place else PLACED[f.name]
            for f in signature.fields if f.kind == "placed"}


def scalars(*names: str) -> Signature:
    return Signature(tuple(Field(n, "scalar") for n in names), ())


def pointers(dtype: str, *roles: str, written: bool = False) -> Signature:
    return Signature((), tuple(Pointer(r, dtype, written) for r in roles))


def stored(kernel, *roles: str, written: bool = False) -> Signature:
    """Pointers of the types `kernel` stores each role in (`emit.Vectors.element`)."""
    return Signature((), tuple(Pointer(r, kernel.element(r), written) for r in roles))


def load_arguments(f: Function, signature: Signature):
    """The fields as named values (sizes and strides i64, scalars splatted vectors of the
    compute type) and the pointers as named pointers of their element type."""
    b = f.b
    values = {}
    for i, field in enumerate(signature.fields):
        at = b.gep(f.args["consts"], [f.i64(i)], name=f"{field.name}.at")
        word = b.load(at, name=field.name if field.kind != "scalar" else f"{field.name}.bits")
        values[field.name] = word if field.kind != "scalar" else \
            f.splat(f.from_bits(word, f"{field.name}.scalar"), name=field.name)
    ptrs = {}
    for i, pointer in enumerate(signature.pointers):
        at = b.gep(f.args["ptrs"], [f.i64(i)], name=f"{pointer.role}.at")
        address = b.load(at, name=f"{pointer.role}.address")
        ptrs[pointer.role] = b.inttoptr(address, POINTER_TYPES[pointer.dtype].as_pointer(),
                                        name=pointer.role)
    return values, ptrs


def new_function(module: ir.Module, name: str, dtype: str, lanes: int,
                 target: Target | None) -> Function:
    """A kernel with the call signature every kernel has, for `target`: its FMAs, and where it
    has AVX512-BF16 a float32 kernel's conversion to bfloat16 by instruction (None: a scalar
    function, with neither)."""
    f = Function(module, name, CALL_PARAMS, dtype, lanes, target is not None and target.fma)
    f.masks_words = target is not None and target.isa == "avx512"  # AVX512BW's masked moves
    if target is not None and target.has("avx512_bf16") and dtype == "float32" \
            and lanes == CONVERTED_LANES:
        f.convert_bf16(target.features_for("avx512_bf16"))
    return f
