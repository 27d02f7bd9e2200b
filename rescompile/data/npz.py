"""Training data as arrays in one `.npz` file: `images` [N, H, W, C] (uint8 pixels 0-255, or
floats on any scale) and `labels` [N] (integer class ids), and optionally `val_images` and
`val_labels`, the held-out set; without them a seeded split (`split.py`) holds some images
out. The file is read bounded and from a regular file only, its members' sizes checked before
anything is decompressed, and nothing is unpickled (`archive.read_npz`)."""

from __future__ import annotations

import numpy as np

from ..archive import read_npz
from ..fileio import memory_limit, read_bounded
from .errors import DataError
from .split import split

IMAGE_DTYPES = ("uint8", "float32", "float64")
LABEL_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
PAIRS = (("images", "labels"), ("val_images", "val_labels"))
MAX_FILE_BYTES = 64 << 30


def load_npz(path, num_classes, val_fraction):
    """(train images, train labels, held-out images, held-out labels, classes): images as
    stored (uint8 or float), int64 labels, and the class count (the model's, else the
    labels')."""
    if path is None:
        raise DataError("npz data needs --data-dir FILE.npz")
    data = read_bounded(path, "npz data", min(MAX_FILE_BYTES, memory_limit()),
                        "half the memory available, room left to decompress it", DataError)
    arrays = read_npz(path, data=data, error=DataError,
                      dtypes=IMAGE_DTYPES + LABEL_DTYPES)
    known = [name for pair in PAIRS for name in pair]
    for name in arrays:
        if name not in known:
            raise DataError(f"{path}: unknown array {name[:60]!r}; expected "
                            f"{', '.join(known)}")
    train = _pair(path, arrays, *PAIRS[0], required=True)
    held = _pair(path, arrays, *PAIRS[1], required=False)
    if held is not None and held[0].shape[1:] != train[0].shape[1:]:
        raise DataError(f"{path}: val_images are {list(held[0].shape[1:])} images, images "
                        f"{list(train[0].shape[1:])}")
    given = [(names[1], pair[1]) for names, pair in zip(PAIRS, (train, held)) if pair is not None]
    classes = num_classes or 1 + max(int(labels.max()) for _, labels in given)
    for name, labels in given:
        if labels.max() >= classes:
            raise DataError(f"{path}: {name} holds class {int(labels.max())}, outside the "
                            f"model's {classes} classes (0 to {classes - 1})")
    if held is None:
        train_at, held_at = split(train[1], val_fraction, str(path))
        held = train[0][held_at], train[1][held_at]
        train = train[0][train_at], train[1][train_at]
    return (*train, *held, classes)


def _pair(path, arrays, images_name: str, labels_name: str, required: bool):
    if images_name not in arrays and labels_name not in arrays and not required:
        return None
    for name in (images_name, labels_name):
        if name not in arrays:
            raise DataError(f"{path}: no array {name!r} (an npz for training holds images "
                            f"[N, H, W, C] and labels [N], and optionally val_images and "
                            f"val_labels)")
    images, labels = arrays[images_name], arrays[labels_name]
    if images.ndim != 4 or not len(images) or images.dtype.name not in IMAGE_DTYPES:
        raise DataError(f"{path}: {images_name} must be uint8 or float [N, H, W, C] with N >= 1, "
                        f"got {images.dtype} {list(images.shape)}")
    if labels.shape != (len(images),) or labels.dtype.name not in LABEL_DTYPES:
        raise DataError(f"{path}: {labels_name} must be {len(images)} integer class ids [N], "
                        f"got {labels.dtype} {list(labels.shape)}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(f"{path}: {images_name} holds non-finite values")
    if labels.min() < 0:
        raise DataError(f"{path}: {labels_name} holds class {int(labels.min())}; class ids "
                        f"start at 0")
    return images, labels.astype(np.int64)
