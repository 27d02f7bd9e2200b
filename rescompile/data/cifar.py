"""Loader for the original CIFAR-10 / CIFAR-100 binary files.

Each record is `label_bytes` label bytes followed by 3072 pixel bytes stored
channel-major (1024 R, then 1024 G, then 1024 B, each 32x32 row-major). CIFAR-100
records carry (coarse, fine) labels; we keep the fine one, the last label byte.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import open_regular
from ..resources import check_fits
from .errors import DataError

PIXEL_BYTES = 32 * 32 * 3


@dataclass(frozen=True)
class CifarFormat:
    name: str
    subfolder: str  # where the official archive unpacks, accepted below data_dir
    train_files: tuple
    test_files: tuple
    label_bytes: int
    num_classes: int

    @property
    def record_bytes(self):
        return self.label_bytes + PIXEL_BYTES


CIFAR10 = CifarFormat("cifar10", "cifar-10-batches-bin",
                      tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                      label_bytes=1, num_classes=10)
CIFAR100 = CifarFormat("cifar100", "cifar-100-binary", ("train.bin",), ("test.bin",),
                       label_bytes=2, num_classes=100)


# Reading holds each file's records and their NHWC copy, then the concatenation of those.
COPIES = 3


def load_cifar(data_dir, fmt):
    """Return (train_images, train_labels, test_images, test_labels): uint8 NHWC, int64."""
    folder = _find_folder(Path(data_dir), fmt)
    sizes = [(folder / f).stat().st_size for f in fmt.train_files + fmt.test_files]
    check_fits(COPIES * sum(sizes), f"{folder}: the {fmt.name} files")
    train = [_read_records(folder / f, fmt) for f in fmt.train_files]
    test = [_read_records(folder / f, fmt) for f in fmt.test_files]
    return (*_concat(train), *_concat(test))


def _find_folder(data_dir, fmt):
    if not data_dir.is_dir():
        raise DataError(f"{fmt.name}: data directory {data_dir} does not exist")
    names = fmt.train_files + fmt.test_files
    candidates = (data_dir, data_dir / fmt.subfolder)
    for folder in candidates:
        if all((folder / n).exists() for n in names):
            return folder
    missing = [n for n in names if not (data_dir / n).exists()]
    raise DataError(f"{fmt.name}: missing {', '.join(missing)} in {data_dir} "
                    f"(also looked in {data_dir / fmt.subfolder}); expected the CIFAR binary "
                    f"files {', '.join(names)}")


def _read_records(path, fmt):
    with open_regular(path, f"{fmt.name} data", DataError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or size % fmt.record_bytes:
            raise DataError(f"{path}: size {size} bytes is not a positive multiple of the "
                            f"{fmt.record_bytes}-byte {fmt.name} record "
                            f"({fmt.label_bytes} label byte(s) + {PIXEL_BYTES} pixel bytes)")
        records = np.fromfile(f, dtype=np.uint8, count=size)
    if records.size != size:
        raise DataError(f"{path}: {records.size} bytes read of {size} (changed while read)")
    records = records.reshape(-1, fmt.record_bytes)
    labels = records[:, fmt.label_bytes - 1].astype(np.int64)
    if labels.max() >= fmt.num_classes:
        raise DataError(f"{path}: label {labels.max()} is out of range for {fmt.name} "
                        f"({fmt.num_classes} classes); is this the right data set?")
    planes = records[:, fmt.label_bytes:].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def _concat(parts):
    images, labels = zip(*parts)
    return np.concatenate(images), np.concatenate(labels)
