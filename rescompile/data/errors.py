"""The one error type the data package raises for bad user input."""

from ..errors import InputError


class DataError(InputError):
    """A data set is missing, malformed, or does not fit the model; the message says which."""
