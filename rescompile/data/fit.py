"""Fit a data set's images to a model's input shape without inventing detail.

Rule: upscale by the largest whole factor that fits (nearest neighbour, so pixels are
repeated, never interpolated), then zero-pad the rest centered; a single channel is
repeated to three. Anything else (shrinking, 3 -> 1 channels) is refused.
"""
import numpy as np

from .errors import DataError


def fit_images(images, input_shape, name="images"):
    """uint8 NHWC -> uint8 [N, *input_shape]; DataError naming both shapes if impossible."""
    have = tuple(images.shape[1:])
    want = tuple(input_shape)
    if len(want) != 3:
        raise DataError(f"model input shape {want} is not (height, width, channels)")
    if have == want:
        return images
    (h, w, c), (height, width, channels) = have, want
    if height < h or width < w or c not in (channels, 1):
        raise DataError(f"{name} have shape {have} and cannot be fitted to the model input "
                        f"{want}: images can only be enlarged, and only 1 channel can be repeated")
    factor = min(height // h, width // w)
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    images = _pad_centered(images, height, width)
    return images.repeat(channels // c, axis=3)


def _pad_centered(images, height, width):
    dh, dw = height - images.shape[1], width - images.shape[2]
    return np.pad(images, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
