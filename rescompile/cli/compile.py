"""`rescompile compile`: lower a spec and write an `.rcx` artifact (graph and weights, no
code: loading it compiles the graph again, from the kernel cache when it can)."""

import time

from ..artifact import save_artifact
from ..runtime import load_checkpoint
from ..runtime import compile
from .common import add_model, resolve_spec, seed_int


def register(sub) -> None:
    p = sub.add_parser("compile", help="write a compiled artifact (.rcx) that rc.load runs")
    add_model(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.rcx")
    p.add_argument("--checkpoint", metavar="FILE", help="take the variables from a checkpoint")
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    spec = resolve_spec(args.spec)
    start = time.perf_counter()
    if args.checkpoint:
        exe = load_checkpoint(args.checkpoint, spec=spec, mode=args.mode, backend=args.backend)
    else:
        exe = compile(spec, mode=args.mode, backend=args.backend, dtype=args.dtype,
                      seed=args.seed)
    save_artifact(exe, args.output)
    print(f"wrote {args.output}: {spec.name} {args.mode} {exe.dtype} ({args.backend}), "
          f"{len(exe.graph.nodes)} nodes, {time.perf_counter() - start:.1f} s")
    return 0
