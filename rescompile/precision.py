"""The precision policy, in one place: for each dtype a model compiles in, what each tensor is
stored as and what every computation runs in.

Design note
-----------
`float64` and `float32` are what they say: every tensor is stored and computed in that type.
`bfloat16` is a mixed-precision mode (DESIGN.md, "Precision"):

    stored as bfloat16      per-image activations and their gradients (every [N, H, W, C]
                            value, the images included once fed), and conv weights as the
                            kernels read them (rounded once per weight load)
    stored as float32       everything else: per-channel vectors (biases, batch-norm gamma,
                            beta, statistics and their gradient sums), the pooled features,
                            logits and loss, the variables (master weights, optimizer slots,
                            moving statistics) and the weight gradients
    computed in float32     everything: every dot product accumulates in float32, epilogues,
                            batch-norm statistics, softmax, the loss and the optimizer

so the graph of a bfloat16 model is a float32 graph (`compute`), the user passes and gets
float32 arrays (`user`), and only storage differs. A bfloat16 value is its float32 value rounded
to the nearest bfloat16, ties to even (`round_bf16`, with `ml_dtypes`).

Every backend asks this module: the reference backend rounds at the points where the CPU
kernels store (`storage` of each node's outputs, `reads_rounded` of conv weights, and
`stored` for the first output of a fused op, which its kernel stores before the rest of the
op reads it), so it stays the oracle for the kernels; the CPU backend takes the element type
of every tensor from `storage`; the cuda backend refuses bfloat16.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import UsageError

BFLOAT16 = "bfloat16"
DTYPES = ("float32", "float64", BFLOAT16)
# Bytes per element of every type a tensor is stored in (the CPU backend's slots are float64).
ITEMSIZE = {"float32": 4, "float64": 8, BFLOAT16: 2}
# The ops whose weight operand (role "w") the kernels read as stored weights.
WEIGHT_KINDS = ("conv", "conv_grad_input")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def compute_dtype(dtype: str) -> str:
    """The type a model of `dtype` computes in: its graph's, its variables' and its user's."""
    return "float32" if dtype == BFLOAT16 else check_dtype(dtype)


def numpy_dtype(storage: str) -> np.dtype:
    """The NumPy type of a stored tensor (ml_dtypes' bfloat16 for bfloat16)."""
    return np.dtype(ml_dtypes.bfloat16) if storage == BFLOAT16 else np.dtype(storage)


def round_bf16(array: np.ndarray) -> np.ndarray:
    """float32 `array` rounded to the nearest bfloat16 (ties to even), as float32."""
    return np.asarray(array, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def to_storage(array: np.ndarray, storage: str) -> np.ndarray:
    """`array` as a C-contiguous array of the stored type."""
    return np.ascontiguousarray(array, dtype=numpy_dtype(storage))


def is_activation(shape) -> bool:
    """A per-image tensor: [N, H, W, C] (the images, every conv's input and output, and their
    gradients)."""
    return len(shape) == 4 and shape[0] == "N"


@dataclass(frozen=True)
class Precision:
    """The policy of one dtype (`float32`, `float64` or `bfloat16`)."""
    dtype: str

    def __post_init__(self):
        check_dtype(self.dtype)

    @property
    def compute(self) -> str:
        return compute_dtype(self.dtype)

    @property
    def mixed(self) -> bool:
        """Whether some tensors are stored in a narrower type than they are computed in."""
        return self.dtype == BFLOAT16

    @property
    def weights(self) -> str:
        """The type the conv kernels read their weights in."""
        return BFLOAT16 if self.mixed else self.compute

    def storage(self, value) -> str:
        """The type a graph value (an `ir.Value`) is stored in between kernels."""
        return BFLOAT16 if self.mixed and is_activation(value.shape) else self.compute

    def reads_rounded(self, op_def, index: int) -> bool:
        """Whether input `index` of an op is read as stored weights (a conv's `w`)."""
        return (self.mixed and op_def.kind in WEIGHT_KINDS
                and index < len(op_def.inputs) and op_def.inputs[index] == "w")

    def round(self, array: np.ndarray, storage: str) -> np.ndarray:
        """`array` as the compute type holds a value stored as `storage`."""
        return round_bf16(array) if storage == BFLOAT16 else array

    @contextlib.contextmanager
    def rounding(self):
        """Within: `stored` rounds the activations a fused op stores before it reads them."""
        token = _ROUNDING.set(self if self.mixed else None)
        try:
            yield
        finally:
            _ROUNDING.reset(token)


_ROUNDING: contextvars.ContextVar[Precision | None] = contextvars.ContextVar("rounding",
                                                                            default=None)


def stored(array: np.ndarray) -> np.ndarray:
    """An activation a fused op's kernel stores and then reads on (its first output, before
    `out2`, the batch statistics or a batch-norm gradient's sums are made of it): as stored,
    under a mixed policy's `rounding()`; as it is otherwise."""
    policy = _ROUNDING.get()
    if policy is None or np.ndim(array) != 4:
        return array
    return round_bf16(array)
