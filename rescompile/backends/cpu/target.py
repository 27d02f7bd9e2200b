"""The instruction set the CPU kernels are generated for, chosen from the host.

Design note
-----------
The project's machines change CPU between sessions (a Zen 5 with AVX-512 one month, a Zen 3
with AVX2 + FMA the next), so nothing about the vector width is fixed in the code: the micro-
kernels take their vector type, tile shape and instructions from a `Target`.

    isa        vector bits  registers  used when the host has
    avx512     512          32         avx512f (+ fma)
    avx2       256          16         avx2 and fma
    portable   128          16         anything x86-64 (SSE2); llvm.fmuladd instead of fma

`host_target()` compiles for the host's own CPU name and feature string (what llvmlite reports),
so LLVM schedules for the exact core. The other two are generic CPU levels (`x86-64-v4`,
`x86-64`), for tests that generate every variant. The target's `fingerprint` (CPU name, feature
string, LLVM version) is part of every cached kernel's key: a kernel built for one CPU is never
loaded on another.

Beside the vector ISA, a target has `extensions`: the bfloat16 instruction sets its kernels may
use. They are not rungs of the ladder above (a Zen 5 has AVX512-BF16 and no AMX):

    extension    instructions                 used when the host has
    avx512_bf16  vdpbf16ps (pairs of bf16)    avx512bf16 (with avx512)
    amx_bf16     tdpbf16ps on AMX tiles       amx-tile and amx-bf16, Linux grants the tile
                                              state, and a smoke run agrees (`amx.py`)

A kernel that uses one carries the target features it needs on its own function (`features`),
so a kernel for an extension the code generator's CPU lacks is still generated, never aborting
the process; it runs only where `runs_here`. `isa=` names a vector ISA and extensions joined by
"+": "avx512+avx512_bf16", "avx512+amx_bf16+avx512_bf16"; a bare "avx512" is AVX-512 without
them (bfloat16 then runs on float32 FMAs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from ...errors import UsageError
from ...precision import ITEMSIZE, compute_dtype

ISAS = ("avx512", "avx2", "portable")
_VECTOR_BITS = {"avx512": 512, "avx2": 256, "portable": 128}
_REGISTERS = {"avx512": 32, "avx2": 16, "portable": 16}
_GENERIC_CPU = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "portable": "x86-64"}
DTYPE_BYTES = ITEMSIZE  # bytes per element of each stored type (precision.py)
EXTENSIONS = ("amx_bf16", "avx512_bf16")  # most capable first
# extension -> (the LLVM features a kernel using it needs, the host features that offer it)
# (AVX512-BF16 with AVX512DQ, which every CPU that has it has: vfpclassps finds denormals.)
_EXTENSION_FEATURES = {"avx512_bf16": ("+avx512f,+avx512bw,+avx512dq,+avx512bf16",
                                       ("avx512bf16",)),
                       "amx_bf16": ("+avx512f,+avx512bw,+amx-tile,+amx-bf16",
                                    ("amx-tile", "amx-bf16"))}


@lru_cache(maxsize=None)
def _initialised() -> bool:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return True


@dataclass(frozen=True)
class Target:
    isa: str
    cpu: str
    features: str
    extensions: tuple[str, ...] = ()  # of EXTENSIONS, in that order

    def __post_init__(self):
        for ext in self.extensions:
            if ext not in EXTENSIONS:
                raise UsageError(f"isa: unknown extension {ext!r}; known: {EXTENSIONS}")
            if self.isa != "avx512":
                raise UsageError(f"isa: {ext} needs avx512 vectors, not {self.isa}")
        object.__setattr__(self, "extensions", tuple(e for e in EXTENSIONS
                                                     if e in self.extensions))

    @property
    def name(self) -> str:
        """As `isa=` takes it: the vector ISA and its extensions."""
        return "+".join((self.isa,) + self.extensions)

    def has(self, extension: str) -> bool:
        return extension in self.extensions

    def features_for(self, extension: str) -> str:
        """The per-function target features of a kernel that uses `extension`: the target's
        own and the extension's."""
        return ",".join(f for f in (self.features, _EXTENSION_FEATURES[extension][0]) if f)

    @property
    def vector_bits(self) -> int:
        return _VECTOR_BITS[self.isa]

    @property
    def registers(self) -> int:
        return _REGISTERS[self.isa]

    @property
    def fma(self) -> bool:
        return self.isa != "portable"

    def lanes(self, dtype: str) -> int:
        """Elements of `dtype`'s compute type a vector holds (bfloat16 computes in float32)."""
        return self.vector_bits // (8 * DTYPE_BYTES[compute_dtype(dtype)])

    @property
    def fingerprint(self) -> str:
        text = "\0".join([self.name, self.cpu, self.features, llvmlite.__version__,
                          ".".join(map(str, llvm.llvm_version_info))])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def machine(self) -> llvm.TargetMachine:
        _initialised()
        target = llvm.Target.from_default_triple()
        return target.create_target_machine(cpu=self.cpu, features=self.features, opt=3,
                                            codemodel="jitdefault")

    def runs_here(self) -> bool:
        """Whether the host can execute code built for this target."""
        host = host_target()
        return (ISAS.index(self.isa) >= ISAS.index(host.isa)
                and set(self.extensions) <= set(host.extensions))


def _host_isa(features: dict) -> str:
    if features.get("avx512f") and features.get("fma"):
        return "avx512"
    if features.get("avx2") and features.get("fma"):
        return "avx2"
    return "portable"


# What a core's caches hold where the system does not say (a Zen 3 core's).
DEFAULT_CACHE_BYTES = {1: 32 * 1024, 2: 512 * 1024, 3: 16 * 1024 * 1024}


@lru_cache(maxsize=None)
def cache_bytes(level: int) -> int:
    """The size of the host's level-`level` data cache (of one core at levels 1 and 2), as
    Linux reports it, or DEFAULT_CACHE_BYTES."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        try:
            if int((index / "level").read_text()) == level and \
                    (index / "type").read_text().strip() in ("Data", "Unified"):
                return _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
    return DEFAULT_CACHE_BYTES[level]


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def advertised(features: dict, isa: str) -> tuple[str, ...]:
    """The extensions a CPU's flags offer beside `isa` (the flags alone: AMX is used only
    when Linux and a smoke run agree too, `host_target`)."""
    return tuple(ext for ext, (_, flags) in _EXTENSION_FEATURES.items()
                 if isa == "avx512" and all(features.get(flag) for flag in flags))


@lru_cache(maxsize=None)
def host_target() -> Target:
    """The host's CPU, features and vector ISA, with each extension its flags offer; AMX only
    if Linux grants the tile state and a smoke run in a subprocess works (`amx.usable`,
    cached under the CPU's fingerprint), else a one-line note and the next one."""
    _initialised()
    features = llvm.get_host_cpu_features()
    isa = _host_isa(features)
    plain = Target(isa, llvm.get_host_cpu_name(), features.flatten())
    extensions = advertised(features, isa)
    if "amx_bf16" in extensions:
        from .amx import usable
        if not usable(plain):
            extensions = tuple(e for e in extensions if e != "amx_bf16")
    return Target(plain.isa, plain.cpu, plain.features, extensions)


def parse_isa(isa: str) -> tuple[str, tuple[str, ...]]:
    """"avx512+avx512_bf16" -> ("avx512", ("avx512_bf16",))."""
    vector, *extensions = isa.split("+")
    if vector not in ISAS:
        raise UsageError(f"isa must be one of {ISAS}, optionally followed by +extension "
                         f"({', '.join(EXTENSIONS)}), got {isa!r}")
    return vector, tuple(extensions)


def generic_target(isa: str) -> Target:
    """A target for an instruction set rather than a CPU (for tests of every variant)."""
    vector, extensions = parse_isa(isa)
    return Target(vector, _GENERIC_CPU[vector], "", extensions)


def target_for(isa: str | None, runnable: bool = True) -> Target:
    """The host's own target, or one for `isa` (refused if the host cannot run it, unless
    `runnable` is False: kernels only generated, as `dump --kernels --isa` shows them): the
    host's CPU with other extensions, or a generic CPU for another vector ISA."""
    host = host_target()
    if isa is None or isa == host.name:
        return host
    vector, extensions = parse_isa(isa)
    target = (Target(host.isa, host.cpu, host.features, extensions) if vector == host.isa
              else generic_target(isa))
    if runnable and not target.runs_here():
        raise ValueError(f"isa {isa!r} cannot run on this CPU ({host.cpu}, {host.name})")
    return target
