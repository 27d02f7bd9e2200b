"""`rescompile dump`: print the graph after any compiler step (of the pipeline the backend
takes), the passes' log and remarks, or what the backend allocates.

`--after all` writes every stage as a numbered file (`03-fold_bn.txt`) into the directory `-o`
names. The text format ends with a footer: the pass log and every refused fold or fusion.
"""

from pathlib import Path

from ..compiler import lower
from ..dump import FORMATS, render
from ..entries import make_entries
from ..errors import UsageError
from .common import (add_model, positive_int, resolve_spec, write_or_print, write_text)

EXTENSIONS = {"text": "txt", "json": "json", "dot": "dot"}
VIEWS = [  # what else dump can print
    ("--remarks", "the pass log and the refused folds and fusions"),
    ("--memory", "what the backend allocates for the main entry"),
    ("--kernels", "the CPU backend's generated kernels (their LLVM IR)"),
    ("--schedule", "the CPU backend's schedule (segments, steps, placements, remarks)"),
]


def register(sub) -> None:
    p = sub.add_parser("dump", help="print the graph after a compiler step")
    add_model(p)  # --backend: the pipeline it takes, whose memory it reports
    p.add_argument("--after", metavar="STAGE", help="a stage name, or 'all' (default: the last)")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("-o", "--output", metavar="PATH", help="file (a directory with --after all)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="stop after build (and autodiff): no passes")
    for flag, what in VIEWS:
        p.add_argument(flag, action="store_true", help=f"print {what} instead of a graph")
    p.add_argument("--batch", type=positive_int, default=128, help="batch size for --memory")
    p.add_argument("--asm", action="store_true",
                   help="with --kernels: the optimised assembly instead of the IR")
    p.add_argument("--node", metavar="SUBSTRING",
                   help="with --kernels: only the kernels of nodes whose name contains this")
    p.add_argument("--isa", metavar="ISA",
                   help="with --kernels or --schedule: for this instruction set (a vector ISA "
                        "and extensions: avx512+amx_bf16+avx512_bf16), generated and shown, "
                        "not run, whether or not this host has it")
    p.set_defaults(func=run)


def run(args) -> int:
    lowered = lower(resolve_spec(args.spec), args.mode, args.dtype, optimize=args.optimize,
                    backend=args.backend)
    if (args.kernels or args.schedule) and args.backend != "cpu":
        raise UsageError("--kernels and --schedule show the cpu backend's (drop --backend)")
    if args.isa and not (args.kernels or args.schedule):
        raise UsageError("--isa goes with --kernels or --schedule")
    if args.kernels:
        write_or_print(kernel_listing(lowered, args.node, args.asm, args.isa), args.output)
    elif args.schedule:
        write_or_print(cpu_program(lowered, args.isa).schedule.describe(), args.output)
    elif args.remarks:
        write_or_print(footer(lowered), args.output)
    elif args.memory:
        write_or_print(memory_report(lowered, args.batch, args.backend), args.output)
    elif args.after == "all":
        _dump_all(lowered, args.format, args.output)
    else:
        write_or_print(_render_stage(lowered, args.after, args.format), args.output)
    return 0


def _render_stage(lowered, stage, fmt: str) -> str:
    stages = dict(lowered.stages)
    stage = stage or lowered.stages[-1][0]
    if stage not in stages:
        raise UsageError(f"--after: unknown stage {stage!r}; stages: {', '.join(stages)}, all")
    text = render(stages[stage], fmt)
    return text + footer(lowered) if fmt == "text" else text


def _dump_all(lowered, fmt: str, directory) -> None:
    if not directory:
        raise UsageError("--after all writes one file per stage: name a directory with -o")
    out = Path(directory)
    for i, (name, graph) in enumerate(lowered.stages, start=1):
        write_text(out / f"{i:02d}-{name}.{EXTENSIONS[fmt]}", render(graph, fmt))
    print(f"wrote {len(lowered.stages)} stages to {out}/")


def cpu_program(lowered, isa: str | None = None):
    """The cpu program of `lowered`; for `isa`, its kernels generated and none loaded."""
    from ..backends.cpu import CpuProgram, compile_program
    entries = make_entries(lowered.graph, lowered.mode)
    if isa is not None:
        from ..backends.cpu.target import parse_isa
        parse_isa(isa)  # a usage error for an unknown one
        return CpuProgram(lowered.graph, entries, lowered.dtype, isa=isa, tune=False,
                          generate_only=True)
    return compile_program(lowered.graph, entries, lowered.dtype)


def kernel_listing(lowered, node_filter=None, assembly: bool = False,
                   isa: str | None = None) -> str:
    text = cpu_program(lowered, isa).kernel_listing(node_filter, assembly)
    if not text.strip():
        raise UsageError(f"--node: no node name contains {node_filter!r}")
    return text


def footer(lowered) -> str:
    lines = [f"# pass {record}" for record in lowered.pass_log]
    lines += [f"# remark {remark}" for remark in lowered.remarks]
    return "\n".join(lines) + "\n" if lines else ""


def memory_report(lowered, batch: int, backend: str) -> str:
    """What `backend` allocates to run the entry a user runs most (train_step, or forward)."""
    entries = make_entries(lowered.graph, lowered.mode)
    entry = "train_step" if lowered.mode == "train" else "forward"
    if backend == "cpu":
        program = cpu_program(lowered)
        return program.arena(program.plan(entry).schedule, batch).summary()
    if backend == "cuda":
        from ..backends.cuda.plan import memory_report as cuda_report
        return cuda_report(lowered.graph, entries, entry, batch, lowered.dtype)
    raise UsageError("--memory: the reference backend allocates each value as NumPy computes "
                     "it, with no plan to show (use --backend cpu or cuda)")
