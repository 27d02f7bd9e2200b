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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

ISAS = ("avx512", "avx2", "portable")
_VECTOR_BITS = {"avx512": 512, "avx2": 256, "portable": 128}
_REGISTERS = {"avx512": 32, "avx2": 16, "portable": 16}
_GENERIC_CPU = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "portable": "x86-64"}
DTYPE_BYTES = {"float32": 4, "float64": 8}


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
        return self.vector_bits // (8 * DTYPE_BYTES[dtype])

    @property
    def fingerprint(self) -> str:
        text = "\0".join([self.isa, self.cpu, self.features, llvmlite.__version__,
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
        return ISAS.index(self.isa) >= ISAS.index(host.isa)


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


@lru_cache(maxsize=None)
def host_target() -> Target:
    _initialised()
    features = llvm.get_host_cpu_features()
    return Target(_host_isa(features), llvm.get_host_cpu_name(), features.flatten())


def generic_target(isa: str) -> Target:
    """A target for an instruction set rather than a CPU (for tests of every variant)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    return Target(isa, _GENERIC_CPU[isa], "")


def target_for(isa: str | None) -> Target:
    """The host's own target, or a generic one for `isa` (refused if the host cannot run it)."""
    host = host_target()
    if isa is None or isa == host.isa:
        return host
    target = generic_target(isa)
    if not target.runs_here():
        raise ValueError(f"isa {isa!r} cannot run on this CPU ({host.cpu}, {host.isa})")
    return target
