"""The one error type the data package raises for bad user input."""


class DataError(ValueError):
    """A data set is missing, malformed, or does not fit the model; the message says which."""
