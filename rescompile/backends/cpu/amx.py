"""Whether this host may run AMX kernels: its flags, Linux's permission and a smoke run agree.

Design note
-----------
Linux traps the first AMX instruction of a process (SIGILL: the process dies) until the process
asks for the tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
NUMBA-NOTES "bfloat16 and AMX"), and some hypervisors advertise AMX that traps anyway. So AMX
is used only when

    1. the CPU's flags offer amx-tile and amx-bf16 (`target.advertised`),
    2. this process's request for the tile state succeeds (`request_tile_state`, once), and
    3. a smoke run in a subprocess (the real AMX conv kernel on a small layer, against NumPy)
       exits cleanly: a trap kills the subprocess, not this one. Its verdict is cached under
       the CPU's fingerprint (`<cache>/amx/<fingerprint>.json`), so it costs once per machine.

Otherwise one line on stderr says why, and the kernels use the next instruction set
(AVX512-BF16 where the host has it). The smoke run is `amx_smoke.py`.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from functools import lru_cache

from ...errors import ResourceError
from ...kernel_cache import cache_root, write_cache_file

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SMOKE_SECONDS = 300
SMOKE_MODULE = "rescompile.backends.cpu.amx_smoke"


@lru_cache(maxsize=None)
def request_tile_state() -> str | None:
    """Ask Linux for the AMX tile state for this process (and its children); None when
    granted, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as exc:
        return f"the tile state could not be requested ({exc})"
    if result != 0:
        return f"Linux refused the tile state (arch_prctl: {os.strerror(ctypes.get_errno())})"
    return None


@lru_cache(maxsize=None)
def usable(target) -> bool:
    """Whether AMX kernels may run on this host (`target`: the host's, without extensions);
    if not, a one-line note on stderr. Asked once per process."""
    why = refusal(target)
    if why is not None:
        print(f"rescompile: note: AMX is not used: {why}; bfloat16 runs on the next "
              f"instruction set", file=sys.stderr, flush=True)
    return why is None


def refusal(target, cache_dir=None) -> str | None:
    """Why AMX may not run here (None: it may): the permission, then the cached verdict of
    the smoke run, or a new smoke run."""
    why = request_tile_state()
    if why is not None:
        return why
    root = cache_root(cache_dir)
    name = f"amx/{target.fingerprint}.json"
    try:
        return json.loads((root / name).read_text())["refusal"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    why = smoke_run(target)
    try:
        write_cache_file(root, name, json.dumps({"refusal": why}).encode())
    except ResourceError:
        pass  # measured again next time
    return why


def smoke_run(target) -> str | None:
    """The smoke run in a subprocess: None if it exits cleanly, else what happened."""
    try:
        done = subprocess.run([sys.executable, "-m", SMOKE_MODULE, target.cpu, target.features],
                              capture_output=True, text=True, timeout=SMOKE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"the smoke run did not finish in {SMOKE_SECONDS} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"the smoke run was killed by signal {-done.returncode} (AMX traps here)"
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"the smoke run failed (exit {done.returncode}: {last[:200]})"
