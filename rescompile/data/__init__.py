"""Data sets for training from the command line, with no network access at run time.

load_dataset(name, ...) gives a Dataset of uint8 NHWC images and int64 labels, already
fitted to the model's input shape; BatchStream turns it into reproducible, resumable
training batches, eval_batches into evaluation batches, and Prefetcher runs either
ahead of compute on a background thread.
"""
from dataclasses import dataclass

import numpy as np

from .cifar import CIFAR10, CIFAR100, load_cifar
from .digits import load_digits_split
from .errors import DataError
from .fit import fit_images
from .prefetch import Prefetcher
from .stream import BatchStream, eval_batches
from .synthetic import make_synthetic

__all__ = ["DataError", "Dataset", "load_dataset", "DATASETS",
           "BatchStream", "Prefetcher", "eval_batches", "fit_images"]

SYNTHETIC_SHAPE = (32, 32, 3)
SYNTHETIC_CLASSES = 10


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 NHWC
    train_labels: np.ndarray  # int64
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def _cifar_loader(fmt):
    def load(data_dir, input_shape, num_classes, seed):
        if data_dir is None:
            raise DataError(f"{fmt.name} needs a data directory holding the CIFAR binary files")
        return (*load_cifar(data_dir, fmt), fmt.num_classes)
    return load


def _digits(data_dir, input_shape, num_classes, seed):
    return (*load_digits_split(), 10)


def _synthetic(data_dir, input_shape, num_classes, seed):
    classes = num_classes or SYNTHETIC_CLASSES
    return (*make_synthetic(input_shape or SYNTHETIC_SHAPE, classes, seed), classes)


# name -> loader(data_dir, input_shape, num_classes, seed)
#         -> (train_images, train_labels, test_images, test_labels, num_classes)
DATASETS = {
    "cifar10": _cifar_loader(CIFAR10),
    "cifar100": _cifar_loader(CIFAR100),
    "digits": _digits,
    "synthetic": _synthetic,
}


def load_dataset(name, data_dir=None, input_shape=None, num_classes=None, seed=0):
    """Load a data set by name, fitted to input_shape (H, W, C) if given.

    DataError if the name is unknown, the files are missing or malformed, the images
    cannot be fitted to input_shape, or the class count differs from num_classes.
    seed only shapes the synthetic set; real data sets have fixed splits.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    train_x, train_y, test_x, test_y, classes = DATASETS[name](data_dir, input_shape,
                                                               num_classes, seed)
    if num_classes is not None and num_classes != classes:
        raise DataError(f"data set {name} has {classes} classes but the model expects "
                        f"num_classes={num_classes}")
    if input_shape is not None:
        train_x = fit_images(train_x, input_shape, f"{name} images")
        test_x = fit_images(test_x, input_shape, f"{name} images")
    return Dataset(name, train_x, train_y, test_x, test_y, classes)
