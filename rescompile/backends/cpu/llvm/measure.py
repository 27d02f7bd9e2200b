"""Measuring the machine with the kernel library's own code: the FMA peak (what "% of peak"
in `rescompile bench` is relative to) and the cycle counter the driver's profile counts in.

The peak loop keeps `registers - 2` independent accumulator chains of the target's vectors busy
with fused multiply-adds, as a register-blocked tile does at best (NUMBA-NOTES: about 96
GFLOP/s per Zen 3 core with 12 `<8 x float>` chains).
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

from llvmlite import ir

from ..target import Target
from . import jit
from .emit import I64, Function, new_module

PEAK_SYMBOL = "rescompile_fma_peak"
CYCLES_SYMBOL = "rescompile_cycles"


@dataclass(frozen=True)
class PeakLoop:
    """`registers - 2` chains of FMAs, `iterations` times; one lane's sum goes to `out` so that
    the loop is not optimised away."""
    target: Target
    dtype: str = "float32"
    symbol = PEAK_SYMBOL

    def ir(self) -> str:
        module = new_module(PEAK_SYMBOL)
        target, dtype = self.target, self.dtype
        f = Function(module, PEAK_SYMBOL, [("iterations", I64), ("out", I64.as_pointer())],
                     dtype, target.lanes(dtype), target.fma)
        chains = target.registers - 2
        b = f.b
        acc = [f.slot(f.vector, f"acc{i}", f.vconst(1.0)) for i in range(chains)]
        scale, shift = f.vconst(0.999999), f.vconst(1e-7)
        with f.loop(0, f.args["iterations"], 1, "i"):
            for slot in acc:
                f.set(slot, f.fma(f.get(slot), scale, shift))
        total = f.get(acc[0])
        for slot in acc[1:]:
            total = b.fadd(total, f.get(slot))
        lane = b.extract_element(total, ir.Constant(ir.IntType(32), 0))
        b.store(b.bitcast(b.fpext(lane, ir.DoubleType()) if dtype == "float32" else lane, I64),
                f.args["out"])
        f.finish()
        return str(module)


@dataclass(frozen=True)
class CycleCounter:
    """Returns `llvm.readcyclecounter`: the TSC on x86."""
    target: Target
    symbol = CYCLES_SYMBOL

    def ir(self) -> str:
        module = new_module(CYCLES_SYMBOL)
        fn = ir.Function(module, ir.FunctionType(I64, []), CYCLES_SYMBOL)
        counter = ir.Function(module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        b.ret(b.call(counter, []))
        return str(module)


def fma_peak_gflops(target: Target, threads: int, dtype: str = "float32",
                    seconds: float = 0.2, cache_dir=None) -> float:
    """GFLOP/s of the peak loop on `threads` threads at once (ctypes calls drop the GIL)."""
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)(
        jit.address(PeakLoop(target, dtype), cache_dir))
    sink = (ctypes.c_int64 * threads)()
    flops_per_iteration = 2 * target.lanes(dtype) * (target.registers - 2)
    iterations = 1 << 20
    start = time.perf_counter()
    fn(iterations, ctypes.addressof(sink))
    iterations = max(1, int(iterations * seconds / (time.perf_counter() - start)))
    rates = [0.0] * threads

    def one(t):
        begin = time.perf_counter()
        fn(iterations, ctypes.addressof(sink) + 8 * t)
        rates[t] = iterations * flops_per_iteration / (time.perf_counter() - begin) / 1e9
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(rates)


def cycles_per_second(target: Target, cache_dir=None) -> float:
    """The rate of the cycle counter the driver's profile reads (the TSC on x86)."""
    read = ctypes.CFUNCTYPE(ctypes.c_int64)(jit.address(CycleCounter(target), cache_dir))
    t0, c0 = time.perf_counter(), read()
    time.sleep(0.05)
    return (read() - c0) / (time.perf_counter() - t0)
