"""Float64 partial sums in slots: how every reduction of the training kernels is made
deterministic.

A reduction over pixels (batch statistics, the batch-norm gradient's sums, a weight gradient)
is cut into fixed chunks of pixels, one kernel call each; a call adds its chunk's sums into its
own slot, `p_begin / chunk`, of a [slot][rows][width] float64 buffer, and `reduce.SlotSum`
combines the slots in slot order. Neither the number of threads nor which thread took which
chunk changes a bit of the result.

A slot holds `rows` rows of `width` channels; a call owns channels [c_begin, c_end) of its slot
and zeroes them before adding to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .emit import I32, Function
from .pixels import channel_vectors, load_vector, store_vector

F64 = ir.DoubleType()


@dataclass
class Slot:
    base: ir.Value  # double* at the slot's first element
    width: ir.Value  # i64: channels per row


def statistics_slot(f: Function, doubles, chunk, width, rows) -> Slot:
    """This call's slot of the float64 buffer at `doubles` (`rows`: an int or an i64), its
    channels [c_begin, c_end) of every row zeroed."""
    b = f.b
    rows = f.i64(rows) if isinstance(rows, int) else rows
    slot = b.udiv(f.args["p_begin"], chunk, name="slot")
    base = b.gep(doubles, [b.mul(slot, b.mul(width, rows))], name="slot_base")
    with f.loop(0, rows, 1, "zero_row") as row:
        with f.loop(f.args["c_begin"], f.args["c_end"], 1, "zero") as c:
            b.store(ir.Constant(F64, 0.0), b.gep(base, [b.add(b.mul(width, row), c)]))
    return Slot(base, width)


def halves(f: Function, vector) -> list:
    """A vector of the kernel's dtype as float64 vectors (two halves of a float32 vector)."""
    if f.dtype == "float64":
        return [vector]
    b, half = f.b, f.lanes // 2
    out = []
    for k in range(2):
        lanes = ir.Constant(ir.VectorType(I32, half), list(range(k * half, (k + 1) * half)))
        part = b.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined), lanes)
        out.append(b.fpext(part, ir.VectorType(F64, half)))
    return out


def add_f64(f: Function, slot: Slot, row, c, vector, left=None) -> None:
    """slot[row][c : c + lanes] += vector, in float64 (`row`: an int or an i64); only the
    first `left` lanes (an i64) when given (the last, partial vector of a channel range), by
    masked loads and stores."""
    b = f.b
    row = f.i64(row) if isinstance(row, int) else row
    at = b.gep(slot.base, [b.add(b.mul(slot.width, row), c)])
    offset = 0
    for part in halves(f, vector):
        here = b.gep(at, [f.i64(offset)])
        if left is None:
            where = b.bitcast(here, part.type.as_pointer())
            b.store(b.fadd(b.load(where, align=8), part), where, align=8)
        else:
            mask = f.mask(offset, left, part.type.count)
            f.masked_store(b.fadd(f.masked_load(here, mask), part), here, mask)
        offset += part.type.count


def add_summands(f: Function, total, product, first, second) -> None:
    """The variables `total` += first and `product` += first * second (one rounding: a fused
    multiply-add): every sums kernel's step, so a conv's sums and a standalone kernel's are
    the same bits."""
    f.set(total, f.b.fadd(f.get(total), first))
    f.set(product, f.fma(first, second, f.get(product)))


class BlockSums:
    """Two rows of per-channel sums made SUM_BLOCK pixels at a time (`tuning.SUM_BLOCK`,
    counted from the call's first pixel): each block summed in the kernel's dtype, then added
    into the float64 `slot` as it ends. The blocks, so the bits, are a standalone sums
    kernel's (`reduce.ChannelSums`), whatever tile made the rows. A conv keeps a block's
    running sums in `partial` ([2][width] of its dtype, the thread's scratch) from one tile
    to the next: a panel's are loaded (`open`), added to row by row (`add`), added to the
    slot where a block ends (`end_block`) and stored (`close`); `finish` adds what is left
    at the end of the call."""

    def __init__(self, f: Function, slot: Slot, partial):
        self.f, self.slot, self.partial = f, slot, partial
        with f.loop(0, 2, 1, "zero_partial") as row:
            with f.loop(f.args["c_begin"], f.args["c_end"], 1, "zero_partial_c") as c:
                f.b.store(ir.Constant(f.scalar, 0.0), self._at(row, c))

    def _at(self, row, c):
        b = self.f.b
        row = self.f.i64(row) if isinstance(row, int) else row
        return b.gep(self.partial, [b.add(b.mul(row, self.slot.width), c)])

    def _vector(self, row: int, c, j: int):
        return self._at(row, self.f.b.add(c, self.f.i64(j * self.f.lanes)))

    def open(self, c, masks) -> list:
        """The running sums of the panel from c: two rows of one variable per vector."""
        f = self.f
        return [[f.slot(f.vector, f"sums{row}_{j}",
                        load_vector(f, self._vector(row, c, j), mask, name=f"sums{row}_{j}"))
                 for j, mask in enumerate(masks)] for row in range(2)]

    def add(self, sums, j: int, first, second) -> None:
        add_summands(self.f, sums[0][j], sums[1][j], first, second)

    def end_block(self, sums, c, width) -> None:
        """The block's sums into the slot (the first `width` channels from c: None for
        every lane), and the running sums zeroed."""
        f = self.f
        for row, variables in enumerate(sums):
            for j, variable in enumerate(variables):
                left = None if width is None else f.b.sub(width, f.i64(j * f.lanes))
                add_f64(f, self.slot, row, f.b.add(c, f.i64(j * f.lanes)), f.get(variable),
                        left)
                f.set(variable, f.vconst(0.0))

    def close(self, sums, c, masks) -> None:
        for row, variables in enumerate(sums):
            for j, (variable, mask) in enumerate(zip(variables, masks)):
                store_vector(self.f, self.f.get(variable), self._vector(row, c, j), mask)

    def finish(self) -> None:
        """The last block's sums, every channel's, into the slot."""
        f = self.f

        def vector(c, mask):
            left = None if mask is None else f.b.sub(f.args["c_end"], c, name="lanes_left")
            for row in range(2):
                add_f64(f, self.slot, row, c, load_vector(f, self._at(row, c), mask), left)
        channel_vectors(f, vector)
