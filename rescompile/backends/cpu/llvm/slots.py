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
    first `left` lanes (an i64) when given (the last, partial vector of a channel range)."""
    b = f.b
    row = f.i64(row) if isinstance(row, int) else row
    at = b.gep(slot.base, [b.add(b.mul(slot.width, row), c)])
    if left is None:
        offset = 0
        for part in halves(f, vector):
            where = b.bitcast(b.gep(at, [f.i64(offset)]), part.type.as_pointer())
            b.store(b.fadd(b.load(where, align=8), part), where, align=8)
            offset += part.type.count
        return
    for lane in range(f.lanes):
        with b.if_then(b.icmp_signed("<", f.i64(lane), left)):
            value = b.extract_element(vector, ir.Constant(I32, lane))
            if f.dtype == "float32":
                value = b.fpext(value, F64)
            where = b.gep(at, [f.i64(lane)])
            b.store(b.fadd(b.load(where), value), where)
