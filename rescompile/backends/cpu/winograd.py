"""Winograd's minimal filtering F(2 x 2, 3 x 3) for the CPU backend's stride-1 3 x 3
convolutions in inference: the transforms' matrices, the weight transform, and which layers
take it.

Design note
-----------
A 3 x 3 convolution computes each 2 x 2 block ("tile") of output pixels from the 4 x 4 input
window over it. Lavin and Gray's algorithm (2016), with the points 0, 1, -1 and infinity,
writes that as, per pair of input and output channels,

    Y = A^T [ (G g G^T) * (B^T d B) ] A        g: 3 x 3 weights, d: 4 x 4 window, * elementwise

so after the transforms a tile costs 16 products per channel pair instead of 36: 16 matrix
products, one per point of the 4 x 4 transformed grid, of the tiles' transformed inputs by
the transformed weights (U = G g G^T, made once per weight load, `weights.py`, from the
weights as the kernels read them: rounded to bfloat16 first in a bfloat16 model). That is 2.25x
fewer multiply-adds; the transforms are additions only (B and A hold 0 and +-1), and the
weight transform's halves are exact in binary.

Numbers: a Winograd output is a different float sum than the direct convolution's, so its
last bits differ; it sums 16 dot products of cin terms rather than one of 9 cin, and on a
64-channel layer its float32 error against float64 was 0.26-0.42 of the direct kernel's
(`tests/test_winograd.py` bounds it by the direct kernel's). The choice is fixed by the
layer's shape and type alone (`applies`), never timed, so a layer gives the same bits on every
thread count, batch and host. Training keeps the direct kernel wherever a convolution makes
batch statistics of its output as it stores it, and for the gradients.

A bfloat16 model on AVX512-BF16 multiplies bfloat16 pairs (vdpbf16ps), so its transformed
inputs and weights are rounded to bfloat16, a rounding of sums of up to 4 inputs (9 weights)
that the direct kernel, whose operands are stored values, does not make. The roundings stay
inside bfloat16's own noise: a small preset's logits within 4.4e-3 of the bfloat16
reference's (`tests/test_winograd.py`; tolerance 2e-2); ResNet-164's, with random batch-norm
statistics, within 3.7e-2 of float64's, where the direct kernels' were 5.1e-2 and the
bfloat16 reference's own 4.1e-2 (Zen 4). ResNet-164 at batch 128 ran 1.14-1.25x faster with
them (213-245 ms a call against 245-271).
"""

from __future__ import annotations

import numpy as np

WEIGHT_TAPS = 3  # the kernel's side: F(2 x 2, 3 x 3)
TILE = 2  # output pixels per side of a tile
WINDOW = TILE + WEIGHT_TAPS - 1  # input pixels per side of a tile's window
POINTS = WINDOW * WINDOW  # products per tile and channel pair

# B^T (input), G (weights) and A^T (output) of F(2, 3); F(2 x 2, 3 x 3) nests each twice.
INPUT_TRANSFORM = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WEIGHT_TRANSFORM = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
OUTPUT_TRANSFORM = ((1, 1, 1, 0), (0, 1, -1, -1))

# The smallest output map (per side) that takes Winograd. On a 7 x 7 map 16 tiles cover 64
# pixels for 49, and the transformed weights, 16/9 of the direct kernel's, are read once per
# image at batch 1; still ResNet-18's 7 x 7, 512-channel layers ran 1.35-1.4x the direct
# kernel's speed on tiles of 8 rows (`tuning.EMPTY_ROWS`; Zen 5). Smaller maps, whose
# weights weigh more still against their pixels, were not measured.
MIN_MAP = 7


def transform_weights(w: np.ndarray) -> np.ndarray:
    """HWIO 3 x 3 weights as U = G g G^T per channel pair, [4, 4, cin, cout] (packed like a
    4 x 4 kernel: point (i, j)'s matrix is its "tap"), computed in float64 and rounded once."""
    g = np.asarray(WEIGHT_TRANSFORM)
    u = np.einsum("ai,ijck,bj->abck", g, w.astype(np.float64), g)
    return u.astype(w.dtype)


def tiles(pixels: int) -> int:
    """Tiles along a side of `pixels` output pixels (an odd side's last tile overhangs it)."""
    return -(-pixels // TILE)


def applies(k: int, stride: int, pads, out_hw, cin: int, lanes: int, vector: bool) -> bool:
    """Whether a convolution runs as Winograd tiles: 3 x 3, stride 1, padded 1 on every side
    (output maps the size of the input's), a map at least MIN_MAP a side, whole vectors of
    input channels (the input transform runs a vector of them at a time), and `vector`: its
    direct kernel would multiply with vector instructions, not AMX tiles (the transforms are
    float32 or float64 sums; the products fused multiply-adds in that type, or vdpbf16ps on
    the transformed inputs and weights rounded to bfloat16)."""
    return (vector and k == WEIGHT_TAPS and stride == 1 and tuple(pads) == (1, 1, 1, 1)
            and min(out_hw) >= MIN_MAP and cin % lanes == 0)


def window_pads(out_hw) -> tuple[int, int, int, int]:
    """The input's zero border a Winograd convolution reads: 1 on every side, and 1 more
    below and to the right of an odd map, which its last tiles' windows overhang."""
    oh, ow = out_hw
    return 1, 1 + oh % TILE, 1, 1 + ow % TILE
