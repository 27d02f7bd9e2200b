"""Compile micro-kernel IR to machine code, cache the object code on disk, load it, and hand
out function addresses.

Design note
-----------
A kernel is a frozen dataclass (`conv.ConvKernel`, `sync.Barrier`, ...) with a `symbol`, a
`target` and an `ir()` method that generates its IR text from its fields alone. The IR is
optimised at -O3 for the target and emitted as an object file, cached under
`<cache dir>/objects/<key>.o`. The key hashes what the IR is a function of: the kernel's fields
(its repr, target included), the source of the generator (this package, and `ops/` whose
formulas it computes), and the target's fingerprint (CPU name, feature string, llvmlite and
LLVM versions). So an entry built for another CPU, compiler or generator is never found, let
alone loaded, and a hit needs no IR at all (generating it is most of a warm start). Each file starts with a header holding the sha256
of the object bytes; an entry that is truncated, corrupt or written by something else fails
that check and is rebuilt (and rewritten atomically), never loaded.

Loading an object is a few milliseconds (NUMBA-NOTES): each kernel gets its own MCJIT engine,
kept alive for the process, so symbols of different kernels never clash. The cache directory
is trusted like the kernel cache beside it (DESIGN: "Trust").
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import llvmlite.binding as llvm

from ....errors import ResourceError
from ....kernel_cache import cache_root, key, write_cache_file
from ..target import Target

_MAGIC = b"rescompile-object-1\n"
_engines: dict[str, int] = {}  # key -> address (the engines live in _keep)
_keep: list = []
_lock = threading.Lock()


def generator_sources() -> list[Path]:
    """The source the IR is a function of: this package, the target's definitions, the tuning
    constants, Winograd's matrices, and `ops/`, whose formulas the kernels compute
    (`ops/norm.py`)."""
    here = Path(__file__).parent
    ops = here.parents[2] / "ops"
    return (sorted(here.glob("*.py"))
            + [here.parent / name for name in ("target.py", "tuning.py", "winograd.py")]
            + sorted(ops.glob("*.py")))


@lru_cache(maxsize=None)
def generator_digest() -> str:
    h = hashlib.sha256()
    for path in generator_sources():
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(kernel) -> str:
    return key(repr(kernel), kernel.target.fingerprint, generator_digest())


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


def _intact(data: bytes) -> bytes | None:
    """The object code of a cache file, or None unless its header's digest matches it."""
    if not data.startswith(_MAGIC):
        return None
    digest, body = data[len(_MAGIC):len(_MAGIC) + 64], data[len(_MAGIC) + 65:]
    return body if hashlib.sha256(body).hexdigest().encode() == digest else None


def _read_cached(path: Path, repair: bool = False) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    body = _intact(data)
    if body is None and repair:
        warnings.warn(f"{path}: corrupt kernel cache entry removed and rebuilt",
                      RuntimeWarning, stacklevel=4)
        path.unlink(missing_ok=True)
    return body


def _object_name(kernel) -> str:
    return f"objects/{cache_key(kernel)}.o"


def cached(kernel, cache_dir=None) -> bool:
    """Whether the kernel is loaded in this process or found, intact, in the cache."""
    return cache_key(kernel) in _engines or \
        _read_cached(cache_root(cache_dir) / _object_name(kernel)) is not None


def cached_object(kernel, cache_dir=None) -> bytes:
    root = cache_root(cache_dir)
    body = _read_cached(root / _object_name(kernel), repair=True)
    if body is None:
        body = object_code(kernel.ir(), kernel.target)
        header = _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
        try:
            write_cache_file(root, _object_name(kernel), header + body)
        except ResourceError as exc:
            _warn_once(f"kernel cache not written: {exc}")
    return body


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    # An unwritable cache costs a recompile next time, nothing else; say so once, not per
    # kernel.
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def address(kernel, cache_dir=None, check_host: bool = True) -> int:
    """The address of the kernel's function (compiled, or loaded, once per process); refused
    for a target the host cannot run, unless `check_host` is False (the AMX smoke run, which
    finds out in a process of its own)."""
    key = cache_key(kernel)
    with _lock:
        if key not in _engines:
            target = kernel.target
            if check_host and not target.runs_here():
                raise ValueError(f"kernels for {target.isa} cannot run on this CPU")
            engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target.machine())
            engine.add_object_file(llvm.ObjectFileRef.from_data(cached_object(kernel,
                                                                              cache_dir)))
            engine.finalize_object()
            _keep.append(engine)
            _engines[key] = engine.get_function_address(kernel.symbol)
        return _engines[key]
