"""Every op rescompile knows. Importing this package registers them all."""

from .registry import OPS, OpDef, define, get
from . import collective, conv, norm, elementwise, pool, head, update, fused, fused_train  # noqa: F401

__all__ = ["OPS", "OpDef", "define", "get"]
