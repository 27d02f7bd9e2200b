"""The `rescompile` command line. Each command lives in its own module with `register(sub)`
(adds its parser) and a `run(args)` the parser points at.

A user's mistake (a `UserError`) is one line on stderr and the error's own exit code (2 usage,
3 spec, 4 input or data, 5 checkpoint or artifact, 6 resources, 7 device, 8 training
diverged); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import UserError

COMMANDS = ("dump", "run", "check", "compile", "cache", "bench", "train", "eval", "predict",
            "interop", "tune")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error (the usage is
    one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="rescompile", description=(
        "Compile ResNets described by a small spec into fast executables."))
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "tune", True) is False:
        # every executable this command compiles keeps the derived tiles (the cpu backend's
        # default reads this)
        os.environ["RESCOMPILE_TUNE"] = "0"
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"rescompile {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
