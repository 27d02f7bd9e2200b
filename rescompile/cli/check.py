"""`rescompile check`: prove the passes changed no numbers.

Runs the reference interpreter on the graph after every pass, on a seeded random batch with
non-trivial BN statistics, prints the largest relative change of the outputs per pass, and exits
1 naming the first pass (and the first node in it) that moves them past tolerance.
"""

from ..compiler import lower
from ..check import TOLERANCE, check_stages
from .common import add_dtype, add_mode, add_spec, positive_int, resolve_spec, seed_int


def register(sub) -> None:
    p = sub.add_parser("check", help="check that no compiler pass changes the numbers")
    add_spec(p)
    add_mode(p)
    add_dtype(p, default="float64")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--tolerance", type=float, help="relative to max (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ")")
    p.set_defaults(func=run)


def run(args) -> int:
    lowered = lower(resolve_spec(args.spec), args.mode, args.dtype, verify_each=True)
    report = check_stages(lowered, args.batch, args.seed, args.tolerance)
    if args.dtype == "bfloat16":
        print("note: a bfloat16 model's passes are checked in float32, its compute type (where "
              "bfloat16 rounds moves with each fusion by design)")
    print(f"{'stage':<20} {'max rel change':>14}  worst output")
    for stage in report.stages:
        print(f"{stage.stage:<20} {stage.change:>14.3g}  {stage.worst_output}")
    if report.ok:
        print(f"ok: every pass within {report.tolerance:g} ({args.mode}, {args.dtype})")
        return 0
    print(f"FAIL: pass {report.failed_pass!r} moves the outputs past {report.tolerance:g}; "
          f"first disagreeing node: {report.first_bad_node or 'none found by name'}")
    return 1
