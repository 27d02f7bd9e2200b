"""Images to classify, from the files a user names: PNG or JPEG files (each one image, read as
an image folder's are) and `.npy` arrays of NHWC images (uint8 pixels, or floats on the
training data's scale; fitted to the input as array data sets are). Each input gets a label
for the output: the file's path, and `path[i]` for row i of an array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..archive import parse_npy
from ..fileio import memory_limit, read_bounded, regular_file
from .errors import DataError
from .fit import fit_images
from .imagefile import SUFFIXES, check_channels, is_image_file, read_image


def load_inputs(paths, input_shape) -> tuple[list[str], list[np.ndarray]]:
    """(one label per image, arrays of pixels [n, H, W, C] of `input_shape`, one per file)."""
    labels, arrays = [], []
    for path in map(Path, paths):
        regular_file(path, "images", DataError)  # a device or FIFO is said to be one
        if is_image_file(path):
            check_channels(input_shape, str(path))
            labels.append(str(path))
            arrays.append(read_image(path, input_shape)[None])
        elif path.suffix.lower() == ".npy":
            images = _array(path, input_shape)
            labels += [f"{path}[{i}]" for i in range(len(images))]
            arrays.append(images)
        else:
            raise DataError(f"{path}: expected a .npy array or an image file "
                            f"({', '.join(SUFFIXES)})")
    return labels, arrays


def _array(path: Path, input_shape) -> np.ndarray:
    data = read_bounded(path, "images", memory_limit(), "half the memory available (the array "
                        "is copied once as it is parsed)", DataError)
    images = parse_npy(path, "images", data, error=DataError)
    if images.ndim != 4 or not len(images):
        raise DataError(f"{path}: expected images [N, H, W, C] with N >= 1, got shape "
                        f"{list(images.shape)}")
    return fit_images(images, input_shape, str(path))
