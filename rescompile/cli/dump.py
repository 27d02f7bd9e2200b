"""`rescompile dump`: print the graph after any compiler step."""

from ..compiler import lower
from ..dump import FORMATS, render
from .common import add_dtype, add_mode, add_spec, resolve_spec, write_or_print


def register(sub) -> None:
    p = sub.add_parser("dump", help="print the graph after a compiler step")
    add_spec(p)
    add_mode(p)
    add_dtype(p)
    p.add_argument("--after", metavar="STAGE", help="a stage name (default: the last)")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("-o", "--output", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    lowered = lower(resolve_spec(args.spec), args.mode, args.dtype)
    stages = dict(lowered.stages)
    stage = args.after or lowered.stages[-1][0]
    if stage not in stages:
        raise ValueError(f"--after: unknown stage {stage!r}; stages: {', '.join(stages)}")
    write_or_print(render(stages[stage], args.format), args.output)
    return 0
