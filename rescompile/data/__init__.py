"""Data sets for training from the command line, with no network access at run time.

load_dataset(name, ...) gives a Dataset of NHWC images (uint8 pixels; an npz file's may be
floats) and int64 labels, already fitted to the model's input shape, with the class names
where the data has them (image folders); BatchStream turns it into reproducible, resumable
training batches, eval_batches into evaluation batches, and Prefetcher runs either ahead of
compute on a background thread. Normalization turns pixels into model inputs, and a
DataRecord is what a checkpoint keeps of the data for `eval` and `predict`.
"""
from dataclasses import dataclass

import numpy as np

from .cifar import CIFAR10, CIFAR100, load_cifar
from .digits import load_digits_split
from .errors import DataError
from .fit import fit_images
from .folder import load_folder
from .normalize import Normalization
from .npz import load_npz
from .prefetch import Prefetcher
from .record import DataRecord
from .split import DEFAULT_VAL_FRACTION
from .stream import BatchStream, eval_batches
from .synthetic import make_synthetic

__all__ = ["DataError", "DataRecord", "Dataset", "Normalization", "load_dataset", "DATASETS",
           "BatchStream", "Prefetcher", "eval_batches", "fit_images", "DEFAULT_VAL_FRACTION"]

SYNTHETIC_SHAPE = (32, 32, 3)
SYNTHETIC_CLASSES = 10


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # NHWC, uint8 (or an npz file's floats)
    train_labels: np.ndarray  # int64
    test_images: np.ndarray   # the held-out split
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Source:
    """What a loader is asked for."""
    data_dir: str | None
    input_shape: tuple | None
    num_classes: int | None
    seed: int
    val_fraction: float


def _cifar_loader(fmt):
    def load(source):
        if source.data_dir is None:
            raise DataError(f"{fmt.name} needs a data directory holding the CIFAR binary files")
        return (*load_cifar(source.data_dir, fmt), fmt.num_classes, None)
    return load


def _digits(source):
    return (*load_digits_split(), 10, None)


def _synthetic(source):
    classes = source.num_classes or SYNTHETIC_CLASSES
    return (*make_synthetic(source.input_shape or SYNTHETIC_SHAPE, classes, source.seed),
            classes, None)


def _folder(source):
    if source.data_dir is None or source.input_shape is None:
        raise DataError("folder data needs --data-dir DIR and the model's input shape")
    *arrays, names = load_folder(source.data_dir, source.input_shape, source.num_classes,
                                 source.val_fraction)
    return (*arrays, len(names), names)


def _npz(source):
    return (*load_npz(source.data_dir, source.num_classes, source.val_fraction), None)


# name -> loader(Source) -> (train_images, train_labels, test_images, test_labels,
#                            num_classes, class names or None)
DATASETS = {
    "cifar10": _cifar_loader(CIFAR10),
    "cifar100": _cifar_loader(CIFAR100),
    "digits": _digits,
    "synthetic": _synthetic,
    "folder": _folder,
    "npz": _npz,
}


def load_dataset(name, data_dir=None, input_shape=None, num_classes=None, seed=0,
                 val_fraction=DEFAULT_VAL_FRACTION):
    """Load a data set by name, fitted to input_shape (H, W, C) if given.

    DataError if the name is unknown, the files are missing or malformed, the images
    cannot be fitted to input_shape, or the class count differs from num_classes.
    seed only shapes the synthetic set; real data sets have fixed splits. val_fraction is
    what an image folder without train/val or an npz file without val arrays holds out.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    source = Source(data_dir, None if input_shape is None else tuple(input_shape), num_classes,
                    seed, val_fraction)
    train_x, train_y, test_x, test_y, classes, names = DATASETS[name](source)
    if num_classes is not None and num_classes != classes:
        raise DataError(f"data set {name} has {classes} classes but the model expects "
                        f"num_classes={num_classes}")
    if input_shape is not None:
        train_x = fit_images(train_x, input_shape, f"{name} images")
        test_x = fit_images(test_x, input_shape, f"{name} images")
    return Dataset(name, train_x, train_y, test_x, test_y, classes, names)
