"""`rescompile bench`: time a compiled model beside PyTorch eager, torch.compile and ONNX
Runtime (see bench.py).

Run it as a user's machine runs: where OPENBLAS_CORETYPE is forced, unset it for this one
command (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE rescompile bench ...`): the peers and
the training kernels use OpenBLAS."""

from ..bench import PEERS, bench, format_report, report_json
from .common import add_model, positive_int, resolve_spec


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a model (compile, run, baselines)")
    add_model(p)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--repeat", type=positive_int, default=6,
                   help="timed runs in all, over the rounds (the median is reported)")
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="interleaved rounds of rescompile and every peer")
    p.add_argument("--profile", action="store_true", help="per-kernel table")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--no-peers", dest="peers", action="store_false",
                       help="skip PyTorch, torch.compile and ONNX Runtime")
    peers.add_argument("--peer", action="append", choices=list(PEERS),
                       help="time this peer (repeat for several; default: every one)")
    p.add_argument("--own-process", action="store_true", default=None,
                   help="also time each contender in a fresh process of its own at batch > 1 "
                        "(batch 1 always does, beside the interleaved rounds)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the warm-compile measurement (a second process)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    report = bench(resolve_spec(args.spec), args.mode, args.batch, args.backend, args.dtype,
                   args.repeat, args.profile, args.peer or args.peers, args.warm,
                   rounds=args.rounds,
                   own_process=args.own_process)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report_json(report))
    return 0
