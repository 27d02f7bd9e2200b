"""The collective ops (`ops/collective.py`) as kernels: the ranks of a data-parallel job
exchange per-channel vectors in the middle of the driver's run.

Design note
-----------
A synchronised batch norm needs the global batch's statistics forward and the mean of the
ranks' gradient sums backward. Run as host steps, each exchange cut the step into a driver run
before it and one after: ResNet-164's train step became 328 runs, each with its Python call,
its bindings and its host step, and every rank's jitter between them became the other's wait.
As kernel steps, a synchronised step is as many runs as an unsynchronised one.

`RankExchange(op)` on channels [0, width) (one call: the step is one piece):
1. copies this rank's two vectors into its row of the gather buffer, [ranks][2][width];
2. with more than one rank, calls the transport, which sends that row to every other rank and
   receives theirs into their rows;
3. combines the rows as the op defines it (`collective.COMBINE`), adding the ranks' terms in
   rank order, so that every rank computes the same bits, and the same as the reference.

`Transport`: `rescompile_exchange(link, row, rows, bytes)` posts MPI_Irecv from and MPI_Isend
to every other rank, then MPI_Tests each request until all are done or the exchange deadline
passes (in cycles of the counter the driver's profile reads). Then, or when MPI returns an
error, it sets FAILED (and ERROR): every later exchange of the run returns at once, the run
ends with garbage in what follows, and the program raises, naming the ranks whose requests
are pending (`cpu/link.py`). It calls MPI through the addresses in the link, with the handle
and request sizes of the library mpi4py loaded (`world.NativeMpi`): nothing of MPI's headers
is assumed, and the object code holds no address, so it is cached like any kernel.

The link: int64 words the program fills from the job's world before each run: the header
(`LINK_HEADER`), then 2 x ranks done flags (request i < ranks receives from rank i, request
ranks + i sends to it), an MPI_Status, and 2 x ranks MPI_Requests, each in whole words.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from ....ops.collective import COMBINE
from ..target import Target
from . import abi
from .arith import Vec
from .emit import I8, I32, I64, VOID, Function, new_module

# The link's header words.
(RANKS, RANK, TRANSPORT, GATHER, DEADLINE, FAILED, ERROR, COMM, BYTE, TAG, ISEND, IRECV,
 TEST) = range(13)
LINK_HEADER = 16
LINK_VALUE = "rank:link"  # the name a step's link pointer binds to
TRANSPORT_SYMBOL = "rescompile_exchange"
I8P = I8.as_pointer()


def words(nbytes: int) -> int:
    return -(-nbytes // 8)


@dataclass(frozen=True)
class RankExchange:
    """One collective op's exchange and combination, in `dtype`."""
    dtype: str
    target: Target
    op: str
    storage: tuple[tuple[str, str], ...] = ()

    @property
    def symbol(self) -> str:
        return f"exchange_{self.op}_{self.dtype}"

    @property
    def signature(self) -> abi.Signature:
        return (abi.sizes("width") + abi.pointers("int64", "link")
                + abi.pointers(self.dtype, "in0", "in1")
                + abi.pointers(self.dtype, "out0", "out1", written=True))

    def ir(self) -> str:
        module = new_module(self.symbol)
        f = abi.new_function(module, self.symbol, self.dtype, 1, None)
        v, ptr = abi.load_arguments(f, self.signature)
        b, width, link = f.b, v["width"], ptr["link"]
        ranks, rank = (b.load(f.element(link, w), name=n) for w, n in ((RANKS, "ranks"),
                                                                      (RANK, "rank")))
        rows = b.inttoptr(b.load(f.element(link, GATHER)), f.scalar.as_pointer(), name="rows")
        row_length = b.mul(width, f.i64(2), name="row_length")
        mine = f.element(rows, b.mul(rank, row_length), name="mine")

        b.comment("this rank's two vectors into its row")
        with f.loop(0, width, 1, "c") as c:
            for k in range(2):
                b.store(b.load(f.element(ptr[f"in{k}"], c)),
                        f.element(mine, b.add(c, b.mul(width, f.i64(k)))))

        b.comment("the other ranks' rows")
        with b.if_then(b.icmp_signed(">", ranks, f.i64(1))):
            transport = b.inttoptr(b.load(f.element(link, TRANSPORT)),
                                   TRANSPORT_TYPE.as_pointer())
            row_bytes = b.mul(row_length, f.i64(f.scalar_bytes), name="row_bytes")
            b.call(transport, [link, b.bitcast(mine, I8P), b.bitcast(rows, I8P), row_bytes])

        b.comment(f"{self.op}: the ranks' rows combined, rank by rank")
        count = b.uitofp(ranks, f.scalar, name="count")
        with f.loop(0, width, 1, "c") as c:
            def operand(k):
                return lambda r: Vec(f, b.load(f.element(
                    rows, b.add(b.mul(r, row_length), b.add(b.mul(width, f.i64(k)), c)))))

            def over_ranks(term):
                total = f.slot(f.scalar, "total", term(f.i64(0)).value)
                with f.loop(1, ranks, 1, "r") as r:
                    f.set(total, b.fadd(f.get(total), term(r).value))
                return Vec(f, b.fdiv(f.get(total), count))

            outs = COMBINE[self.op](over_ranks, operand(0), operand(1))
            for k, out in enumerate(outs):
                b.store(out.value, f.element(ptr[f"out{k}"], c))
        f.finish()
        return str(module)


TRANSPORT_TYPE = ir.FunctionType(VOID, [I64.as_pointer(), I8P, I8P, I64])


@dataclass(frozen=True)
class Transport:
    """`rescompile_exchange` for an MPI library whose communicator and datatype handles take
    `handle_bytes`, a request `request_bytes` and a status `status_bytes`."""
    target: Target
    handle_bytes: int
    request_bytes: int
    status_bytes: int
    symbol = TRANSPORT_SYMBOL

    def ir(self) -> str:
        module = new_module(TRANSPORT_SYMBOL)
        f = Function(module, TRANSPORT_SYMBOL, list(zip(("link", "row", "rows", "bytes"),
                                                        TRANSPORT_TYPE.args)), "float64", 1,
                     False)
        _TransportEmitter(f, ir.IntType(8 * self.handle_bytes), words(self.request_bytes),
                          words(self.status_bytes)).emit()
        f.finish()
        return str(module)


class _TransportEmitter:
    def __init__(self, f: Function, handle: ir.IntType, request_words: int, status_words: int):
        self.f, self.b, self.handle = f, f.b, handle
        self.request_words, self.status_words = request_words, status_words
        self.link = f.args["link"]
        post = ir.FunctionType(I32, [I8P, I32, handle, I32, I32, handle, I8P])
        self.post_type = post.as_pointer()
        self.test_type = ir.FunctionType(I32, [I8P, I32.as_pointer(), I8P]).as_pointer()
        self.cycles = f.intrinsic("llvm.readcyclecounter", I64, [])

    def word(self, index, name: str = ""):
        return self.b.load(self.f.element(self.link, index), name=name)

    def emit(self) -> None:
        f, b = self.f, self.b
        with b.if_then(b.icmp_signed("==", self.word(FAILED, "failed"), f.i64(0))):
            ranks, rank = self.word(RANKS, "ranks"), self.word(RANK, "rank")
            done = f.element(self.link, f.i64(LINK_HEADER), name="done")
            status = f.element(done, b.mul(ranks, f.i64(2)), name="status")
            requests = f.element(status, f.i64(self.status_words), name="requests")
            b.comment("post a receive from and a send to every other rank")
            with f.loop(0, ranks, 1, "peer") as peer:
                self.post(peer, rank, ranks, done, requests)
            b.comment("test every pending request until all are done or the deadline passes")
            self.wait(b.mul(ranks, f.i64(2)), done, status, requests)

    def request(self, requests, index):
        return self.b.bitcast(self.f.element(requests, self.b.mul(
            index, self.f.i64(self.request_words))), I8P, name="request")

    def post(self, peer, rank, ranks, done, requests) -> None:
        f, b = self.f, self.b
        receive, send = peer, b.add(ranks, peer)
        mine = b.icmp_signed("==", peer, rank, name="mine")
        b.store(b.zext(mine, I64), f.element(done, receive))
        b.store(b.zext(mine, I64), f.element(done, send))
        with b.if_then(b.not_(mine)):
            count = b.trunc(f.args["bytes"], I32, name="count")
            common = [b.trunc(self.word(BYTE), self.handle), b.trunc(peer, I32),
                      b.trunc(self.word(TAG), I32), b.trunc(self.word(COMM), self.handle)]
            into = f.element(f.args["rows"], b.mul(peer, f.args["bytes"]), name="into")
            for function, buffer, index in ((IRECV, into, receive),
                                            (ISEND, f.args["row"], send)):
                call = b.inttoptr(self.word(function), self.post_type)
                self.checked(b.call(call, [buffer, count, *common,
                                           self.request(requests, index)]))

    def checked(self, code) -> None:
        """A nonzero MPI return code fails the exchange, kept in ERROR."""
        b = self.b
        with b.if_then(b.icmp_signed("!=", code, ir.Constant(I32, 0))):
            b.store(b.sext(code, I64), self.f.element(self.link, ERROR))
            b.store(self.f.i64(1), self.f.element(self.link, FAILED))

    def wait(self, count, done, status, requests) -> None:
        f, b = self.f, self.b
        flag = f.slot(I32, "flag")
        start = b.call(self.cycles, [], name="start")
        poll, test, finished = (f.fn.append_basic_block(n) for n in ("poll", "test", "finished"))
        b.branch(poll)
        b.position_at_end(poll)
        b.cbranch(b.icmp_signed("!=", self.word(FAILED), f.i64(0)), finished, test)
        b.position_at_end(test)
        pending = f.slot(I64, "pending", f.i64(0))
        with f.loop(0, count, 1, "i") as i:
            at = f.element(done, i)
            with b.if_then(b.icmp_signed("==", b.load(at), f.i64(0))):
                f.set(flag, ir.Constant(I32, 0))
                test = b.inttoptr(self.word(TEST), self.test_type)
                self.checked(b.call(test, [self.request(requests, i), flag,
                                           b.bitcast(status, I8P)]))
                b.store(b.zext(b.icmp_signed("!=", f.get(flag), ir.Constant(I32, 0)), I64), at)
                f.set(pending, b.add(f.get(pending), b.sub(f.i64(1), b.load(at))))
        waited = b.sub(b.call(self.cycles, []), start, name="waited")
        late = b.icmp_signed(">", waited, self.word(DEADLINE, "deadline"), name="late")
        with b.if_then(b.and_(late, b.icmp_signed("!=", f.get(pending), f.i64(0)))):
            b.store(f.i64(1), f.element(self.link, FAILED))
        b.cbranch(b.icmp_signed("==", f.get(pending), f.i64(0)), finished, poll)
        b.position_at_end(finished)
