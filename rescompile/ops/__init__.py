"""Every op rescompile knows. Importing this package registers them all."""

from .registry import OPS, OpDef, define, get
from . import conv, norm, elementwise, pool, head, update, fused  # noqa: F401  (registration)

__all__ = ["OPS", "OpDef", "define", "get"]
