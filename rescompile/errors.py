"""Errors a user can meet; each message names the field, tensor, node or file at fault."""


class GraphError(ValueError):
    """A malformed graph; the message names the offending node or value."""


class InputError(ValueError):
    """A tensor given at run time does not fit the executable (shape, dtype, name)."""


class CheckpointError(ValueError):
    """A checkpoint or artifact that is corrupt or does not match its spec."""

