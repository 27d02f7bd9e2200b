"""Every op rescompile knows. Importing this package registers them all."""

from .registry import OPS, OpDef, define, get
from . import (collective, conv, norm, elementwise, pool, channels, head, update, fused,  # noqa: F401
               fused_train)

__all__ = ["OPS", "OpDef", "define", "get"]
