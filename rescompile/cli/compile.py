"""`rescompile compile`: lower a spec and write an `.rcx` artifact (graph and weights, no
code: loading it compiles the graph again, from the kernel cache when it can)."""

import sys
import time

from ..artifact import save_artifact
from ..runtime import compile
from .common import add_model, resolve_spec, seed_int


def register(sub) -> None:
    p = sub.add_parser("compile", help="write a compiled artifact (.rcx) that rc.load runs")
    add_model(p, dtype_default=None)
    p.add_argument("-o", "--output", required=True, metavar="FILE.rcx")
    p.add_argument("--checkpoint", metavar="FILE", help="take the variables from a checkpoint")
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=run)


def _keeps_data(path, spec) -> bool:
    from ..data import DataRecord
    from ..training import data_record
    return data_record(path, spec) != DataRecord()


def run(args) -> int:
    spec = resolve_spec(args.spec)
    start = time.perf_counter()
    if args.checkpoint:
        # As eval loads it: the differing field named, the [train] table free in infer mode.
        from ..training import load_for_spec
        exe = load_for_spec(args.checkpoint, spec, mode=args.mode, backend=args.backend,
                            dtype=args.dtype)
    else:
        exe = compile(spec, mode=args.mode, backend=args.backend,
                      dtype=args.dtype or "float32", seed=args.seed)
    save_artifact(exe, args.output)
    if args.checkpoint and _keeps_data(args.checkpoint, spec):
        print(f"note: {args.checkpoint} keeps its data's class names and normalisation, which "
              f"an artifact does not: eval and predict with the checkpoint to use them",
              file=sys.stderr)
    print(f"wrote {args.output}: {spec.name} {args.mode} {exe.dtype} ({args.backend}), "
          f"{len(exe.graph.nodes)} nodes, {time.perf_counter() - start:.1f} s")
    return 0
