"""A barrier for the threads of one parallel region, in IR (Numba has no atomics on the CPU).

Design note
-----------
At batch 1 both cores share every layer inside one persistent parallel region (a region per
layer costs about 0.1 ms to start, NUMBA-NOTES), so layers are separated by this barrier:
a sense-counting barrier over words on their own cache lines, `arrived`, `generation` and
`sleepers`. Each thread reads the generation, then increments `arrived`; the last to arrive
resets `arrived` and bumps the generation (release), which lets the others through (acquire).

Waiting spins with `pause` for a short while (a layer at batch 1 is tens of microseconds, so
the other thread is usually close), then sleeps on the generation word with Linux's futex
(at most `sleep_ns` at a time, then it looks again): where the late thread was preempted
(another framework's thread pool spinning in the same process, any busy thread of a user's
server), a waiter that only yielded would keep taking the core back from the very thread it
waits for; one that sleeps gives it up, and costs a wake-up when the last thread arrives,
which wakes the sleepers only if some said they sleep.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ..target import Target
from .emit import I32, I64, VOID, new_module

SYMBOL = "rescompile_barrier"
STATE_WORDS = 24  # arrived at word 0, generation at 8, sleepers at 16: a cache line each
# Pauses a waiter spins before it sleeps (a pause is about 30 ns on Zen 5): between the
# layers of a call, about 60 us; between calls, where a pool thread waits for the next one
# (`pool.py`), about 1.5 ms, so that calls made back to back never wait for a sleeping
# thread to be woken (on a VM whose idle vCPUs halt, a wake-up took 100-300 us).
SPINS_BEFORE_SLEEP = 2000
SPINS_BETWEEN_CALLS = 50_000
# The longest one sleep lasts before the waiter looks again (a wake-up is never lost, so this
# only bounds the damage of a bug): a millisecond within a call; between calls, where a pool
# thread may wait for hours, 100 ms, so that an idle process wakes 10 times a second.
SLEEP_NS = 1_000_000
SLEEP_NS_BETWEEN_CALLS = 100_000_000
SYS_FUTEX = 202  # x86-64
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129


@dataclass(frozen=True)
class Barrier:
    """`rescompile_barrier(state, threads, spins, sleep_ns)`: returns once `threads` threads
    have called it on the same `state` (STATE_WORDS words, zeroed once); a waiter spins
    `spins` times, then sleeps at most `sleep_ns` at a time."""
    target: Target
    symbol = SYMBOL

    def ir(self) -> str:
        module = new_module(SYMBOL)
        fn = ir.Function(module, ir.FunctionType(VOID, [I64.as_pointer(), I64, I64, I64]),
                         SYMBOL)
        for arg, name in zip(fn.args, ("state", "threads", "spins", "sleep_ns")):
            arg.name = name
        _Emitter(module, fn, *fn.args).emit()
        return str(module)


class _Emitter:
    def __init__(self, module, fn, state, threads, spins, sleep_ns):
        self.fn, self.state, self.threads = fn, state, threads
        self.spins, self.sleep_ns = spins, sleep_ns
        self.pause = ir.Function(module, ir.FunctionType(VOID, []), "llvm.x86.sse2.pause")
        self.syscall = ir.Function(module, ir.FunctionType(I64, [I64], var_arg=True),
                                   "syscall")
        self.b = ir.IRBuilder(fn.append_basic_block("entry"))

    def word(self, index: int, name: str):
        return self.b.gep(self.state, [ir.Constant(I64, index)], name=name)

    def emit(self) -> None:
        b = self.b
        arrived, generation = self.word(0, "arrived"), self.word(8, "generation")
        sleepers = self.word(16, "sleepers")
        last, wait, done = (self.fn.append_basic_block(n) for n in ("last", "wait", "done"))
        b.comment("read the generation before arriving")
        seen = b.load_atomic(generation, "acquire", 8, name="seen")
        before = b.atomic_rmw("add", arrived, ir.Constant(I64, 1), "acq_rel", name="before")
        b.cbranch(b.icmp_signed("==", b.add(before, ir.Constant(I64, 1)), self.threads,
                                name="is_last"), last, wait)

        b.position_at_end(last)
        b.comment("the last thread resets the count, releases the others, wakes sleepers")
        b.store_atomic(ir.Constant(I64, 0), arrived, "monotonic", 8)
        b.atomic_rmw("add", generation, ir.Constant(I64, 1), "seq_cst")
        asleep = b.load_atomic(sleepers, "seq_cst", 8, name="asleep")
        with b.if_then(b.icmp_signed("!=", asleep, ir.Constant(I64, 0))):
            self.futex(generation, FUTEX_WAKE_PRIVATE, ir.Constant(I64, 2 ** 31 - 1))
        b.branch(done)

        b.position_at_end(wait)
        self.wait(generation, sleepers, seen, done)
        b.position_at_end(done)
        b.ret_void()

    def wait(self, generation, sleepers, seen, done) -> None:
        """Spin until the generation moves; past `spins` checks, sleep between
        them, counted in `sleepers` so that the last thread knows to wake them."""
        b, entry = self.b, self.b.block
        spin, relax, sleep = (self.fn.append_basic_block(n) for n in ("spin", "relax", "sleep"))
        b.branch(spin)
        b.position_at_end(spin)
        spins = b.phi(I64, name="spins")
        spins.add_incoming(ir.Constant(I64, 0), entry)
        now = b.load_atomic(generation, "acquire", 8, name="now")
        b.cbranch(b.icmp_signed("!=", now, seen, name="released"), done, relax)

        b.position_at_end(relax)
        patient = b.icmp_signed("<", spins, self.spins, name="patient")
        with b.if_else(patient) as (short, long):
            with short:
                b.call(self.pause, [])
            with long:
                b.branch(sleep)
                b.position_at_end(sleep)
                b.comment("say so, look once more (the last thread may have been and gone), "
                          "then sleep while the generation is still what was seen")
                b.atomic_rmw("add", sleepers, ir.Constant(I64, 1), "seq_cst")
                still = b.load_atomic(generation, "seq_cst", 8, name="still")
                with b.if_then(b.icmp_signed("==", still, seen)):
                    self.futex(generation, FUTEX_WAIT_PRIVATE, b.and_(
                        seen, ir.Constant(I64, 2 ** 32 - 1), name="seen_low"),
                        self.timeout())
                b.atomic_rmw("sub", sleepers, ir.Constant(I64, 1), "seq_cst")
        spins.add_incoming(b.add(spins, ir.Constant(I64, 1), name="spins_next"), b.block)
        b.branch(spin)

    def timeout(self):
        """A struct timespec of `sleep_ns` (under a second) on the stack (futex's relative
        timeout)."""
        b = self.b
        with b.goto_entry_block():
            spec = b.alloca(ir.ArrayType(I64, 2), name="timeout")
        b.store(ir.Constant(I64, 0), b.gep(spec, [ir.Constant(I32, 0), ir.Constant(I32, 0)]))
        b.store(self.sleep_ns, b.gep(spec, [ir.Constant(I32, 0), ir.Constant(I32, 1)]))
        return b.ptrtoint(spec, I64, name="timeout_at")

    def futex(self, word, op: int, value, timeout=None) -> None:
        """syscall(SYS_futex, word (its low 32 bits, x86 being little-endian), op, value,
        timeout)."""
        b = self.b
        args = [ir.Constant(I64, SYS_FUTEX), b.ptrtoint(word, I64, name="futex_word"),
                ir.Constant(I64, op), value, timeout or ir.Constant(I64, 0)]
        b.call(self.syscall, args, name="futex")
