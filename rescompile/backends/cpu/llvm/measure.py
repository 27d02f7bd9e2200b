"""Measuring the machine with the kernel library's own code: the peak of the instruction the
kernels multiply with (what "% of peak" in `rescompile bench` is relative to) and the cycle
counter the driver's profile counts in.

A peak loop keeps independent accumulator chains of one instruction busy, as a register-
blocked tile does at best (NUMBA-NOTES: about 96 GFLOP/s per Zen 3 core with 12 `<8 x float>`
FMA chains):

    fma      `registers - 2` chains of vector FMAs (float32 and float64 models, and bfloat16
             on a host without bfloat16 instructions): 2 * lanes FLOP each
    dpbf16   `registers - 2` chains of vdpbf16ps (bfloat16 with AVX512-BF16): 4 * 16 FLOP each
    amx      4 tile accumulators of tdpbf16ps from 2 A and 2 B tiles, as the AMX conv blocks
             them (bfloat16 with AMX): 2 * 16 * 16 * 32 FLOP each
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

from llvmlite import ir

from ..target import Target
from . import jit
from .emit import I8, I32, I64, Function, new_module

PEAK_SYMBOL = "rescompile_peak"
CYCLES_SYMBOL = "rescompile_cycles"
INSTRUCTIONS = ("fma", "dpbf16", "amx")


def peak_instruction(target: Target, dtype: str) -> str:
    """What the kernels of a `dtype` model multiply with on `target` (`kernel_steps.conv_dot`
    on its convolutions)."""
    if dtype != "bfloat16":
        return "fma"
    return "amx" if target.has("amx_bf16") else "dpbf16" if target.has("avx512_bf16") \
        else "fma"


@dataclass(frozen=True)
class PeakLoop:
    """Chains of `instruction`, `iterations` times; one lane's sum goes to `out` so that the
    loop is not optimised away."""
    target: Target
    dtype: str = "float32"
    instruction: str = "fma"
    symbol = PEAK_SYMBOL

    @property
    def chains(self) -> int:
        return 4 if self.instruction == "amx" else self.target.registers - 2

    @property
    def flops_per_iteration(self) -> int:
        per = {"fma": 2 * self.target.lanes(self.dtype), "dpbf16": 4 * 16,
               "amx": 2 * 16 * 16 * 32}[self.instruction]
        return per * self.chains

    def ir(self) -> str:
        module = new_module(PEAK_SYMBOL)
        target, dtype = self.target, "float32" if self.instruction != "fma" else self.dtype
        lanes = 16 if self.instruction != "fma" else target.lanes(dtype)
        f = Function(module, PEAK_SYMBOL, [("iterations", I64), ("out", I64.as_pointer())],
                     dtype, lanes, target.fma)
        if self.instruction == "amx":
            self._amx(f)
        else:
            self._vectors(f)
        f.finish()
        return str(module)

    def _vectors(self, f) -> None:
        b = f.b
        acc = [f.slot(f.vector, f"acc{i}", f.vconst(1.0)) for i in range(self.chains)]
        if self.instruction == "dpbf16":
            f.require(self.target.features_for("avx512_bf16"))
            pairs = ir.VectorType(I32, 16)
            dot = f.intrinsic("llvm.x86.avx512bf16.dpbf16ps.512", f.vector,
                              [f.vector, pairs, pairs])
            a = ir.Constant(pairs, [0x3A833A83] * 16)  # pairs of bfloat16 1e-3
            step = lambda value: b.call(dot, [value, a, a])  # noqa: E731
        else:
            scale, shift = f.vconst(0.999999), f.vconst(1e-7)
            step = lambda value: f.fma(value, scale, shift)  # noqa: E731
        with f.loop(0, f.args["iterations"], 1, "i"):
            for slot in acc:
                f.set(slot, step(f.get(slot)))
        total = f.get(acc[0])
        for slot in acc[1:]:
            total = b.fadd(total, f.get(slot))
        self._out(f, b.extract_element(total, ir.Constant(I32, 0)))

    def _amx(self, f) -> None:
        from .amx import A_TILES, B_TILES, C_TILES, TILE_BYTES, TILE_ROWS, Tiles
        f.require(self.target.features_for("amx_bf16"))
        b, tiles = f.b, Tiles(f)
        data = f.slot(ir.ArrayType(I8, TILE_ROWS * TILE_BYTES), "tile_data")
        at = b.bitcast(data, I8.as_pointer())
        for byte in range(TILE_ROWS * TILE_BYTES):  # zeros: the sums stay finite
            b.store(ir.Constant(I8, 0), b.gep(at, [f.i64(byte)]))
        tiles.configure()
        for tile in (*A_TILES, *B_TILES):
            tiles.load(tile, at, f.i64(TILE_BYTES))
        for row in C_TILES:
            for tile in row:
                tiles.zero(tile)
        with f.loop(0, f.args["iterations"], 1, "i"):
            for a, row in enumerate(C_TILES):
                for j, tile in enumerate(row):
                    tiles.dot(tile, A_TILES[a], B_TILES[j])
        tiles.store(C_TILES[0][0], at, f.i64(TILE_BYTES))
        tiles.release()
        self._out(f, b.load(b.bitcast(at, ir.FloatType().as_pointer())))

    @staticmethod
    def _out(f, lane) -> None:
        b = f.b
        wide = b.fpext(lane, ir.DoubleType()) if lane.type == ir.FloatType() else lane
        b.store(b.bitcast(wide, I64), f.args["out"])


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


def peak_gflops(target: Target, threads: int, dtype: str = "float32", seconds: float = 0.2,
                cache_dir=None, instruction: str | None = None) -> float:
    """GFLOP/s of the peak loop of `instruction` (by default what a `dtype` model multiplies
    with: `peak_instruction`) on `threads` threads at once (ctypes calls drop the GIL)."""
    loop = PeakLoop(target, "float32" if dtype == "bfloat16" else dtype,
                    instruction or peak_instruction(target, dtype))
    if loop.instruction == "amx":
        from ..amx import request_tile_state
        if request_tile_state() is not None:
            raise RuntimeError("no AMX tile state: AMX peak not measured")
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)(jit.address(loop, cache_dir))
    sink = (ctypes.c_int64 * threads)()
    iterations = 1 << 20
    start = time.perf_counter()
    fn(iterations, ctypes.addressof(sink))
    iterations = max(1, int(iterations * seconds / (time.perf_counter() - start)))
    rates = [0.0] * threads

    def one(t):
        begin = time.perf_counter()
        fn(iterations, ctypes.addressof(sink) + 8 * t)
        rates[t] = iterations * loop.flops_per_iteration / (time.perf_counter() - begin) / 1e9
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(rates)


def fma_peak_gflops(target: Target, threads: int, dtype: str = "float32",
                    seconds: float = 0.2, cache_dir=None) -> float:
    """The FMA loop's peak (`peak_gflops` of "fma")."""
    return peak_gflops(target, threads, dtype, seconds, cache_dir, "fma")


def cycles_per_second(target: Target, cache_dir=None) -> float:
    """The rate of the cycle counter the driver's profile reads (the TSC on x86)."""
    read = ctypes.CFUNCTYPE(ctypes.c_int64)(jit.address(CycleCounter(target), cache_dir))
    t0, c0 = time.perf_counter(), read()
    time.sleep(0.05)
    return (read() - c0) / (time.perf_counter() - t0)
