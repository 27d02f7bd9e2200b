"""`rescompile tune`: measure the cpu backend's conv tiles for a model again on this host and
keep the choices (`backends/cpu/autotune.py`); print each choice and its candidates' speed."""

from ..compiler import lower
from ..entries import make_entries
from .common import add_dtype, add_mode, add_spec, resolve_spec


def register(sub) -> None:
    p = sub.add_parser("tune", help="measure the cpu kernels' tiles for a model again")
    add_spec(p)
    add_mode(p)
    add_dtype(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..backends.cpu import compile_program
    lowered = lower(resolve_spec(args.spec), args.mode, args.dtype, backend="cpu")
    program = compile_program(lowered.graph, make_entries(lowered.graph, args.mode),
                              args.dtype, retune=True)
    remarks = {name: why for plan in program.plans.values()
               for name, why in plan.schedule.remarks if why.startswith("tile ")}
    for name, why in remarks.items():
        print(f"{name}: {why}")
    print(f"measured {program.tuner.measured} candidates; choices kept in "
          f"{program.tuner.path}")
    return 0
