"""The seed's CIFAR pipeline (tensorflow/models research/resnet/cifar_input.py) in NumPy.

Training: zero-pad to (H+pad, W+pad) centered, random crop back to (H, W), random
horizontal flip with p=0.5, then normalisation (the seed's per-image standardization unless
another is given). Eval: normalisation only. The crop and the flip can each be turned off.

Randomness is drawn up front by `draw_crops_and_flips`, in a fixed order (row offsets,
column offsets, flips), so a caller holding the same Generator state can recompute a
batch exactly, and the batch itself is then a pure function of those draws. The draws are
made whichever augmentations are on, so turning one off leaves the other's draws as they were.
"""
import numpy as np


def train_transform(images, rng, pad=4, of_batch=None, crop=True, flip=True, normalize=None):
    """NHWC pixels -> float32 NHWC, augmented and normalised (`normalize`, default
    `standardize`). With `of_batch=(start, size)` the images are [start, start + len(images))
    of a batch of `size`, and get the draws they get in the whole batch (so the ranks of a
    data-parallel job together make exactly the one-process batch)."""
    _, height, width, _ = images.shape
    start, size = of_batch or (0, len(images))
    rows, cols, flips = draw_crops_and_flips(rng, size, pad)
    if not crop:  # the centred window of the padded image is the image itself
        rows = cols = np.full(size, pad // 2)
    if not flip:
        flips = np.zeros(size, bool)
    part = slice(start, start + len(images))
    padded = pad_centered(images, pad)
    return (normalize or standardize)(crop_and_flip(padded, rows[part], cols[part],
                                                    flips[part], height, width))


def eval_transform(images, normalize=None):
    """NHWC pixels -> float32 NHWC, normalised (`normalize`, default `standardize`)."""
    return (normalize or standardize)(images)


def draw_crops_and_flips(rng, n, pad):
    """Crop offsets in [0, pad] (as tf.random_crop) and flip flags, drawn in this order."""
    rows = rng.integers(0, pad + 1, size=n)
    cols = rng.integers(0, pad + 1, size=n)
    flips = rng.random(n) < 0.5
    return rows, cols, flips


def pad_centered(images, pad):
    """Zero-pad H and W by `pad` in total; the odd pixel goes after, as TF's crop_or_pad."""
    before, after = pad // 2, pad - pad // 2
    return np.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))


def crop_and_flip(padded, rows, cols, flips, height, width):
    """Crop a (height, width) window from each padded image at its (row, col) offset,
    mirrored left-right where flipped. One gather does the whole batch."""
    row_idx = rows[:, None] + np.arange(height)
    col_step = np.where(flips[:, None], np.arange(width)[::-1], np.arange(width))
    col_idx = cols[:, None] + col_step
    batch_idx = np.arange(len(padded))[:, None, None]
    return padded[batch_idx, row_idx[:, :, None], col_idx[:, None, :]]


def standardize(images):
    """tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(num_elements))."""
    x = images.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    floor = 1.0 / np.sqrt(np.prod(x.shape[1:]))
    std = np.maximum(x.std(axis=axes, keepdims=True), floor)
    return ((x - mean) / std).astype(np.float32)
