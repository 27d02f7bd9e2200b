"""Image folders, the ImageFolder convention: one sub-folder per class, named after it, with
its PNG or JPEG images directly inside (other files are skipped, as are names starting with
a dot). Class ids are the positions of the sorted folder names. When DIR/train and DIR/val
both exist they hold the training and the held-out images, DIR/val the same classes or some
of them; otherwise DIR holds the class folders and a seeded split (`split.py`) holds some
images out. Every image is fitted to the model's input by `imagefile.read_image`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..resources import check_fits
from .classes import name_problem, names_problem
from .errors import DataError
from .imagefile import check_channels, is_image_file, read_image
from .split import split


def load_folder(root, input_shape, num_classes, val_fraction):
    """(train images, train labels, held-out images, held-out labels, class names): uint8
    NHWC of `input_shape`, int64 labels, a tuple of names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    check_channels(input_shape, str(root))
    train_root, val_root = root / "train", root / "val"
    held_apart = train_root.is_dir() and val_root.is_dir()
    classes = class_folders(train_root if held_apart else root, num_classes)
    files, labels = _listing(train_root if held_apart else root, classes)
    if held_apart:
        for name in class_folders(val_root, None):
            if name not in classes:
                raise DataError(f"{val_root / name}: class folder not among {train_root}'s "
                                f"classes")
        val_files, val_labels = _listing(val_root, classes, missing_ok=True)
    else:
        train, held = split(labels, val_fraction, str(root))
        val_files, val_labels = [files[i] for i in held], labels[held]
        files, labels = [files[i] for i in train], labels[train]
    check_fits(2 * (len(files) + len(val_files)) * int(np.prod(input_shape)),
               f"{root}: the images")
    return (_decode(files, input_shape), labels, _decode(val_files, input_shape), val_labels,
            classes)


def class_folders(folder: Path, num_classes: int | None) -> tuple[str, ...]:
    """The sorted class folder names in `folder`, checked as names (they are data) and
    against the model's class count before any image is read."""
    names = sorted(entry.name for entry in _entries(folder)
                   if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DataError(f"{folder}: no class folders (one sub-folder of images per class)")
    for name in names:
        problem = name_problem(name)
        if problem:
            raise DataError(f"{folder}: class folder {name!r:.80} cannot be a class name: it "
                            f"{problem}")
    problem = names_problem(names)
    if problem:
        raise DataError(f"{folder}: its class folders' names: {problem}")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{folder}: {len(names)} class folders, the model has num_classes = "
                        f"{num_classes}")
    return tuple(names)


def _listing(folder: Path, classes, missing_ok: bool = False):
    """(image paths, int64 labels) of every class folder in `folder`, in class then name
    order. An existing class folder without images is refused: a class with nothing to learn
    from is a mistake (a wrong suffix, say), not a choice."""
    files, labels = [], []
    for label, name in enumerate(classes):
        if missing_ok and not (folder / name).is_dir():
            continue
        found = sorted(p for p in _entries(folder / name)
                       if is_image_file(p) and not p.name.startswith("."))
        if not found:
            raise DataError(f"{folder / name}: class folder with no PNG or JPEG images")
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int64)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list ({exc.strerror or exc})") from None


def _decode(files, input_shape) -> np.ndarray:
    """Every file decoded into one array, in order; Pillow decodes outside the GIL, so a few
    threads share the work. The first file (in order) that fails is the one reported, and
    the files not yet started are dropped."""
    images = np.empty((len(files), *input_shape), np.uint8)
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        for i, image in enumerate(pool.map(lambda f: read_image(f, input_shape), files)):
            images[i] = image
    finally:
        pool.shutdown(cancel_futures=True)
    return images
