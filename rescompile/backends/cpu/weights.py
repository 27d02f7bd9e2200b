"""Conv weights as the micro-kernels read them: packed into panels of a tile's width (and
rotated and transposed for a data gradient), on a cache-line boundary."""

from __future__ import annotations

import numpy as np

from .arena import aligned_empty


def pack_weights(w: np.ndarray, nr: int, out: np.ndarray | None = None) -> np.ndarray:
    """HWIO (or [C, K]) weights as [panel][kh * kw * cin][nr], zero-padded past the last
    output channel, on a cache-line boundary (the kernel's aligned loads need it)."""
    flat = w.reshape(-1, w.shape[-1])
    depth, cout = flat.shape
    panels = -(-cout // nr)
    if out is None:
        out = aligned_empty(panels * depth * nr * w.itemsize).view(w.dtype)
    padded = np.zeros((depth, panels * nr), w.dtype)
    padded[:, :cout] = flat
    out.reshape(panels, depth, nr)[:] = padded.reshape(depth, panels, nr).transpose(1, 0, 2)
    return out


def transformed(w: np.ndarray, transform: str) -> np.ndarray:
    """A data gradient's weights: rotated by 180 degrees, input and output channels swapped."""
    if transform == "dgrad":
        return np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
    return w
