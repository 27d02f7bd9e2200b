"""A seeded synthetic data set for smoke tests: learnable, but needs no files.

Each class has a coarse random template (at most 4x4 blocks per channel, mirrored
left-right) so that the training augmentation's small shifts and horizontal flips keep
the class recognisable; each image is its class template plus Gaussian noise.
"""
import numpy as np

GRID = 4
NOISE_STD = 48.0


def make_synthetic(input_shape, num_classes, seed, train_size=1024, test_size=256):
    """Return (train_images, train_labels, test_images, test_labels): uint8 NHWC, int64."""
    rng = np.random.default_rng(seed)
    templates = _templates(rng, input_shape, num_classes)
    train = _sample(rng, templates, train_size)
    test = _sample(rng, templates, test_size)
    return (*train, *test)


def _templates(rng, input_shape, num_classes):
    height, width, channels = input_shape
    grid_h, grid_w = min(GRID, height), min(GRID, width)
    coarse = rng.uniform(32, 224, size=(num_classes, grid_h, grid_w, channels))
    coarse = (coarse + coarse[:, :, ::-1]) / 2
    rows = np.arange(height) * grid_h // height
    cols = np.arange(width) * grid_w // width
    return coarse[:, rows][:, :, cols]


def _sample(rng, templates, size):
    labels = rng.permutation(np.arange(size) % len(templates)).astype(np.int64)
    noise = rng.normal(0.0, NOISE_STD, size=(size, *templates.shape[1:]))
    images = np.clip(np.rint(templates[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels
