"""Models in and out: PyTorch modules and state dicts (`from_torch`), ONNX files (`from_onnx`,
`onnx_model` for export)."""

from .onnx_import import from_onnx
from .onnx_model import onnx_model
from .torch_import import from_torch

__all__ = ["from_onnx", "from_torch", "onnx_model"]
