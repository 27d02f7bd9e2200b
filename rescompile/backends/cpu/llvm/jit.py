"""Compile micro-kernel IR to machine code, cache the object code on disk, load it, and hand
out function addresses.

Design note
-----------
A kernel's IR is text generated from its signature (`conv.ConvKernel.ir()`, ...). It is
optimised at -O3 for the kernel's `Target` and emitted as an object file, which is cached
under `<cache dir>/objects/<key>.o` with `key = sha256(IR, target fingerprint)`: the
fingerprint holds the CPU name, its feature string and the llvmlite/LLVM versions, so an entry
built for another CPU or compiler is never found, let alone loaded. Each file starts with a
header holding the sha256 of the object bytes; an entry that is truncated, corrupt or written by
something else fails that check and is rebuilt (and rewritten atomically), never loaded.

Loading an object is a few milliseconds (NUMBA-NOTES): each kernel gets its own MCJIT engine,
kept alive for the process, so symbols of different kernels never clash. The cache directory
is trusted like the kernel cache beside it (DESIGN: "Trust").
"""

from __future__ import annotations

import hashlib
import threading

import llvmlite.binding as llvm

from ....fileio import atomic_write, cache_root
from ..target import Target

_MAGIC = b"rescompile-object-1\n"
_engines: dict[tuple[str, str], tuple[object, int]] = {}  # (key, symbol) -> (engine, address)
_lock = threading.Lock()


def cache_key(ir_text: str, target: Target) -> str:
    return hashlib.sha256(f"{target.fingerprint}\0{ir_text}".encode()).hexdigest()


def optimise(ir_text: str, target: Target) -> tuple[llvm.ModuleRef, llvm.TargetMachine]:
    module = llvm.parse_assembly(ir_text)
    module.verify()
    machine = target.machine()
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    builder = llvm.create_pass_builder(machine, tuning)
    builder.getModulePassManager().run(module, builder)
    return module, machine


def object_code(ir_text: str, target: Target) -> bytes:
    module, machine = optimise(ir_text, target)
    return machine.emit_object(module)


def assembly(ir_text: str, target: Target) -> str:
    """The optimised kernel as assembly (for `rescompile dump --kernels --asm` and tests)."""
    module, machine = optimise(ir_text, target)
    return machine.emit_assembly(module)


def _read_cached(path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_MAGIC):
        return None
    digest, body = data[len(_MAGIC):len(_MAGIC) + 64], data[len(_MAGIC) + 65:]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    return body


def cached_object(ir_text: str, target: Target, cache_dir=None) -> bytes:
    path = cache_root(cache_dir) / "objects" / f"{cache_key(ir_text, target)}.o"
    body = _read_cached(path)
    if body is None:
        body = object_code(ir_text, target)
        header = _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
        try:
            atomic_write(path, lambda f: f.write(header + body))
        except OSError:
            pass  # an unwritable cache costs a recompile next time, nothing else
    return body


def address(ir_text: str, symbol: str, target: Target, cache_dir=None) -> int:
    """The address of `symbol` in the compiled IR (compiled or loaded once per process)."""
    key = (cache_key(ir_text, target), symbol)
    with _lock:
        if key not in _engines:
            if not target.runs_here():
                raise ValueError(f"kernels for {target.isa} cannot run on this CPU")
            engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target.machine())
            engine.add_object_file(llvm.ObjectFileRef.from_data(
                cached_object(ir_text, target, cache_dir)))
            engine.finalize_object()
            _engines[key] = (engine, engine.get_function_address(symbol))
        return _engines[key][1]
