"""The `rescompile` command line. Each command lives in its own module with `register(sub)`
(adds its parser) and a `run(args)` the parser points at."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CheckpointError, GraphError, InputError
from ..spec import SpecError

COMMANDS = ("dump", "run", "check", "compile", "cache", "bench", "train", "eval", "predict")
USER_ERRORS = (SpecError, GraphError, InputError, CheckpointError, FileNotFoundError, ValueError)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rescompile", description=(
        "Compile ResNets described by a small spec into fast executables."))
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        print(f"rescompile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
