"""The package's version: a leaf module, so whatever records it imports nothing else."""

__version__ = "0.1.0"
