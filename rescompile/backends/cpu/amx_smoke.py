"""The AMX smoke run (`amx.py`): the real AMX conv kernel on a small layer against NumPy, in a
subprocess of its own (`python -m rescompile.backends.cpu.amx_smoke CPU FEATURES`), so that an
AMX instruction that traps kills it and not the process that asks. Exit 0: AMX works here."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from ...precision import numpy_dtype, round_bf16
from .amx import request_tile_state
from .llvm import abi, jit
from .llvm.amx import AmxConvKernel
from .target import Target
from .weights import pack_weights


def smoke(cpu: str, features: str) -> None:
    """An AMX conv (32 pixels by 32 channels, 64 input channels) against NumPy; raises if
    wrong. Runs in the smoke subprocess only: a trap kills this process."""
    why = request_tile_state()
    if why is not None:
        raise SystemExit(why)
    target = Target("avx512", cpu, features, ("amx_bf16", "avx512_bf16"))
    bf16 = "bfloat16"
    kernel = AmxConvKernel("float32", target, (), None, 32, 2,
                           storage=(("out", bf16), ("w", bf16), ("x", bf16)))
    rng = np.random.default_rng(0)
    pixels, cin, cout = 32, 64, 32
    x = rng.standard_normal((1, 1, pixels, cin)).astype(np.float32)
    w = rng.standard_normal((1, 1, cin, cout)).astype(np.float32)
    out = np.zeros((pixels, cout), numpy_dtype(bf16))
    fields = {"cin": cin, "kh": 1, "kw": 1, "stride": 1, "oh": 1, "ow": pixels,
              "panels_outer": 0, "x.image": pixels * cin, "x.row": pixels * cin,
              "x.pixel": cin, "out.image": pixels * cout, "out.row": pixels * cout,
              "out.pixel": cout, **abi.placed_values(kernel.signature)}
    arrays = {"x": x.astype(numpy_dtype(bf16)), "w": pack_weights(w, 32, None, bf16, "amx"),
              "out": out}
    consts = np.array([int(fields[f.name]) for f in kernel.signature.fields], np.int64)
    pointers = np.array([arrays[p.role].ctypes.data for p in kernel.signature.pointers],
                        np.int64)
    call = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 4)(
        jit.address(kernel, check_host=False))
    call(consts.ctypes.data, pointers.ctypes.data, 0, pixels, 0, cout)
    expected = round_bf16(x[0, 0]) @ round_bf16(w[0, 0])
    error = np.abs(out.astype(np.float32) - expected).max() / np.abs(expected).max()
    if not error < 1e-2:
        raise SystemExit(f"AMX conv off by {error:.3g} relative")


if __name__ == "__main__":
    smoke(*sys.argv[1:3])
