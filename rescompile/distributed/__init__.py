"""Data-parallel training across processes on MPI: the world of ranks, and one rank's step."""

from .world import MpiWorld, Solo, current, joined

__all__ = ["MpiWorld", "Solo", "current", "joined"]
