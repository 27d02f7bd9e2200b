"""A barrier for the threads of one parallel region, in IR (Numba has no atomics on the CPU).

Design note
-----------
At batch 1 both cores share every layer inside one persistent parallel region (a region per
layer costs about 0.1 ms to start, NUMBA-NOTES), so layers are separated by this barrier:
a sense-counting barrier over two words on their own cache lines, `arrived` and `generation`.
Each thread reads the generation, then increments `arrived`; the last to arrive resets
`arrived` and bumps the generation (release), which lets the others through (acquire).

Waiting spins with `pause` for a short while (a layer at batch 1 is tens of microseconds, so
the other thread is usually close), then calls `sched_yield` on every check: on a loaded
machine a waiting thread gives its core away instead of spinning for its whole time slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ..target import Target
from .emit import I32, I64, VOID, new_module

SYMBOL = "rescompile_barrier"
STATE_WORDS = 16  # arrived at word 0, generation at word 8: one cache line each
SPINS_BEFORE_YIELD = 2000


@dataclass(frozen=True)
class Barrier:
    """`rescompile_barrier(state, threads)`: returns once `threads` threads have called it
    on the same `state` (STATE_WORDS words, zeroed once)."""
    target: Target
    symbol = SYMBOL

    def ir(self) -> str:
        module = new_module(SYMBOL)
        fn = ir.Function(module, ir.FunctionType(VOID, [I64.as_pointer(), I64]), SYMBOL)
        state, threads = fn.args
        state.name, threads.name = "state", "threads"
        pause = ir.Function(module, ir.FunctionType(VOID, []), "llvm.x86.sse2.pause")
        sched_yield = ir.Function(module, ir.FunctionType(I32, []), "sched_yield")
        entry, last, wait, spin, relax, done = (fn.append_basic_block(n) for n in (
            "entry", "last", "wait", "spin", "relax", "done"))
        b = ir.IRBuilder(entry)
        arrived = b.gep(state, [ir.Constant(I64, 0)], name="arrived")
        generation = b.gep(state, [ir.Constant(I64, 8)], name="generation")
        b.comment("read the generation before arriving")
        seen = b.load_atomic(generation, "acquire", 8, name="seen")
        before = b.atomic_rmw("add", arrived, ir.Constant(I64, 1), "acq_rel", name="before")
        is_last = b.icmp_signed("==", b.add(before, ir.Constant(I64, 1)), threads)
        b.cbranch(is_last, last, wait)

        b.position_at_end(last)
        b.comment("the last thread resets the count and releases the others")
        b.store_atomic(ir.Constant(I64, 0), arrived, "monotonic", 8)
        b.atomic_rmw("add", generation, ir.Constant(I64, 1), "release")
        b.branch(done)

        b.position_at_end(wait)
        b.branch(spin)
        b.position_at_end(spin)
        spins = b.phi(I64, name="spins")
        spins.add_incoming(ir.Constant(I64, 0), wait)
        now = b.load_atomic(generation, "acquire", 8, name="now")
        b.cbranch(b.icmp_signed("!=", now, seen), done, relax)

        b.position_at_end(relax)
        patient = b.icmp_signed("<", spins, ir.Constant(I64, SPINS_BEFORE_YIELD))
        with b.if_else(patient) as (short, long):
            with short:
                b.call(pause, [])
            with long:
                b.call(sched_yield, [])
        spins.add_incoming(b.add(spins, ir.Constant(I64, 1)), b.block)
        b.branch(spin)

        b.position_at_end(done)
        b.ret_void()
        return str(module)
