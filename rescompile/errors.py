"""Errors a user can meet; each message names the field, tensor, node or file at fault.

A `UserError` is a mistake in what a user gave rescompile (a flag, a spec, a tensor, a file, a
machine without room or without a GPU). The CLI prints its message as one line and exits with
its `exit_code`, one per kind, so scripts can tell them apart. Every other exception is a bug in
rescompile and keeps its traceback.
"""

import importlib


class UserError(Exception):
    exit_code = 2


class UsageError(UserError, ValueError):
    """A flag, keyword or argument that is not accepted."""
    exit_code = 2


class SpecError(UserError, ValueError):
    """A spec is malformed. The message starts with the dotted path of the offending field."""
    exit_code = 3


class InputError(UserError, ValueError):
    """A tensor or data file given at run time does not fit the executable (shape, dtype,
    values, name)."""
    exit_code = 4


class CheckpointError(UserError, ValueError):
    """A checkpoint or artifact that is corrupt, tampered with, or does not match its spec."""
    exit_code = 5


class ResourceError(UserError):
    """The machine cannot do what was asked: memory, a directory that cannot be written, a
    checkpoint directory in use by another run."""
    exit_code = 6


class DeviceError(UserError):
    """The backend's device is not there (CUDA without a GPU)."""
    exit_code = 7


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or update; nothing of that step was applied."""
    exit_code = 8


class GraphError(ValueError):
    """A malformed graph (a bug in a pass or the builder); the message names the offending node
    or value."""


def optional_module(name: str, needed_by: str, extra: str):
    """Import an optional dependency; without it, tell the user which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise UsageError(f"{needed_by} needs {package}: pip install -e \".[{extra}]\"") \
            from None
