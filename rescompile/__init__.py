"""rescompile: a graph-compiling code generator for residual networks."""

from .spec import ResNetSpec, SpecError, load_spec, preset
from .runtime import Executable, compile
from .version import __version__  # noqa: F401
from .errors import (CheckpointError, DeviceError, GraphError, InputError, NonFiniteError,
                     ResourceError, UsageError, UserError)

__all__ = ["ResNetSpec", "SpecError", "load_spec", "preset", "Executable", "compile",
           "CheckpointError", "DeviceError", "GraphError", "InputError", "NonFiniteError",
           "ResourceError", "UsageError", "UserError", "load"]


def load(path, **options):
    """Load a checkpoint (`Executable.save`) or a compiled artifact (`rescompile compile`)."""
    from .artifact import is_artifact, load_artifact
    from .fileio import regular_file
    from .runtime import load_checkpoint
    path = regular_file(path, "checkpoint or artifact", CheckpointError)
    return (load_artifact if is_artifact(path) else load_checkpoint)(path, **options)
