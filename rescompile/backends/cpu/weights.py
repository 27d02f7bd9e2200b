"""Conv weights as the micro-kernels read them: packed into panels of a tile's width (and
rotated and transposed for a data gradient), rounded to the type the kernels read them in
(bfloat16 for a bfloat16 model: held as bfloat16 by the kernels that multiply pairs of it, as
float32 by the FMA kernels, which then widen nothing in their inner loop), on a cache-line
boundary. A weight array is packed and converted once per load (`program.py` repacks only
when the array changes).

A Winograd convolution's weights are transformed first (`winograd.transform_weights`) and
packed as a 4 x 4 kernel: in a panel, point p's [cin][nr] matrix is its p-th block of rows.

Layouts (`Use.layout`), K = kh * kw * cin the depth, R = kw * cin a window row's:

    ""       [panel][K][nr]                 one input channel a row: the FMA tile's
    "vnni2"  [panel][K / 2][nr][2]          pairs of consecutive k interleaved (VNNI-2): a
                                            32-bit lane holds the pair vdpbf16ps multiplies
    "amx"    [panel][kh][R' / 2][nr][2]     VNNI-2 with each window row zero-padded to R', a
                                            multiple of AMX_DEPTH: the rows of AMX B tiles
"""

from __future__ import annotations

import numpy as np

from ...precision import numpy_dtype
from .arena import aligned_empty
from .winograd import WINDOW, transform_weights

AMX_DEPTH = 32  # bfloat16 elements of k per AMX tile row (64 bytes)


def padded_row_depth(row_depth: int) -> int:
    return -(-row_depth // AMX_DEPTH) * AMX_DEPTH


def packed_elements(shape, nr: int, layout: str = "", transform: str = "") -> int:
    """Elements of HWIO (or [C, K]) weights of `shape` packed in `layout` for panels of nr
    (after `transform`)."""
    *taps, cin, cout = (1, 1, *shape) if len(shape) == 2 else shape
    if transform == "dgrad":
        cin, cout = cout, cin
    if transform == "winograd":
        taps = [WINDOW, WINDOW]
    depth = taps[1] * cin
    depth = padded_row_depth(depth) if layout == "amx" else depth
    return -(-cout // nr) * nr * taps[0] * depth


def pack_weights(w: np.ndarray, nr: int, out: np.ndarray | None = None, dtype: str | None = None,
                 layout: str = "") -> np.ndarray:
    """HWIO (or [C, K]) weights in `layout` for panels of `nr` output channels, as `dtype`
    (default: w's), zero-padded past the last output channel, on a cache-line boundary (the
    kernel's aligned loads need it). A bfloat16 model's weights come rounded to bfloat16
    already (and then transformed: a Winograd kernel's are float32 sums of bfloat16 values)."""
    kind = numpy_dtype(dtype) if dtype else w.dtype
    if w.ndim == 2:
        w = w.reshape(1, 1, *w.shape)
    kh, kw, cin, cout = w.shape
    panels = -(-cout // nr)
    depth = kw * cin
    if layout == "amx":
        depth = padded_row_depth(depth)
    elif layout == "vnni2" and depth % 2:
        raise ValueError(f"vnni2 weights need an even depth per window row, got {depth}")
    padded = np.zeros((kh, depth, panels * nr), np.float32 if kind.itemsize == 2 else kind)
    padded[:, :kw * cin, :cout] = w.reshape(kh, kw * cin, cout)
    panels_first = padded.reshape(kh * depth, panels, nr).transpose(1, 0, 2)  # [panel][K][nr]
    if layout in ("vnni2", "amx"):  # [panel][K/2][nr][2]
        panels_first = panels_first.reshape(panels, -1, 2, nr).transpose(0, 1, 3, 2)
    if out is None:
        out = aligned_empty(panels_first.size * kind.itemsize).view(kind)
    out.reshape(panels_first.shape)[:] = panels_first.astype(kind)
    return out


def transformed(w: np.ndarray, transform: str) -> np.ndarray:
    """A data gradient's weights ("dgrad"): rotated by 180 degrees, input and output channels
    swapped; a Winograd convolution's ("winograd"): G g G^T, a 4 x 4 kernel of its points."""
    if transform == "dgrad":
        return np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
    if transform == "winograd":
        return transform_weights(w)
    return w
