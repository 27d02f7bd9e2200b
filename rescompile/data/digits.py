"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn).

scikit-learn is optional, so it is imported only when this data set is asked for.
The split is fixed (permutation seeded with 0, last 20% for test) so test accuracy
stays comparable across training runs whatever their seed.
"""
import math

import numpy as np

from .errors import DataError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
MAX_VALUE = 16  # load_digits pixel values run 0..16


def load_digits_split():
    """Return (train_images, train_labels, test_images, test_labels): uint8 [N,8,8,1], int64."""
    images, labels = _load_raw()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_train = len(labels) - math.ceil(len(labels) * TEST_FRACTION)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def _load_raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the digits data set needs scikit-learn: "
                        "pip install 'rescompile[digits]'") from err
    bunch = load_digits()
    images = np.rint(bunch.images * 255 / MAX_VALUE).astype(np.uint8)
    return images[..., None], bunch.target.astype(np.int64)
