"""Tests for rescompile.data: file formats, the seed's augmentation, resumable streams."""
import itertools
import os
import sys
import time

import numpy as np
import pytest

from rescompile.data import (BatchStream, DataError, Dataset, Normalization, Prefetcher,
                             eval_batches, fit_images, load_dataset)
from rescompile.data.augment import (crop_and_flip, draw_crops_and_flips, eval_transform,
                                     pad_centered, standardize, train_transform)
from rescompile.data.split import split
from rescompile.errors import InputError
from rescompile.fileio import read_bounded, regular_file

# ---------------------------------------------------------------- CIFAR binary files


def _cifar_images(n, offset):
    """Distinct, position-revealing pixels: value depends on (image, channel, row, col)."""
    i, c, y, x = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32),
                             indexing="ij")
    return ((i * 7 + c * 50 + y * 3 + x + offset) % 256).astype(np.uint8)  # [N,3,32,32]


def _write_records(path, label_columns, planes):
    records = np.concatenate([np.stack(label_columns, axis=1).astype(np.uint8),
                              planes.reshape(len(planes), -1)], axis=1)
    path.write_bytes(records.tobytes())


def _write_cifar10(root, per_file=3):
    for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        labels = (np.arange(per_file) + k) % 10
        _write_records(root / name, [labels], _cifar_images(per_file, offset=k * 11))


def test_cifar10_labels_and_channel_major_pixel_order(tmp_path):
    _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, input_shape=(32, 32, 3), num_classes=10)
    assert ds.train_images.shape == (15, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train_labels[:6], [0, 1, 2, 1, 2, 3])
    np.testing.assert_array_equal(ds.test_labels, [5, 6, 7])
    planes = _cifar_images(3, offset=5 * 11)  # test_batch written with k=5
    for img in range(3):
        for y, x, c in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1), (31, 30, 2)]:
            assert ds.test_images[img, y, x, c] == planes[img, c, y, x]
    np.testing.assert_array_equal(ds.test_images, planes.transpose(0, 2, 3, 1))


def test_cifar100_uses_fine_label_and_subfolder(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    coarse, fine = np.array([3, 19, 0, 7]), np.array([99, 42, 0, 58])
    _write_records(folder / "train.bin", [coarse, fine], _cifar_images(4, 0))
    _write_records(folder / "test.bin", [coarse[:2], fine[:2]], _cifar_images(2, 9))
    ds = load_dataset("cifar100", data_dir=tmp_path, num_classes=100)
    np.testing.assert_array_equal(ds.train_labels, fine)
    np.testing.assert_array_equal(ds.test_labels, fine[:2])
    np.testing.assert_array_equal(ds.train_images, _cifar_images(4, 0).transpose(0, 2, 3, 1))


def test_missing_directory_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_dataset("cifar10", data_dir=missing)


def test_missing_files_names_them(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="missing data_batch_3.bin"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_truncated_file_names_record_size(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"test_batch.bin.*3073-byte"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_class_count_mismatch_names_both(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(DataError, match="10 classes.*num_classes=100"):
        load_dataset("cifar10", data_dir=tmp_path, num_classes=100)


def test_unfittable_shape_names_both(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"\(32, 32, 3\).*\(16, 16, 3\)"):
        load_dataset("cifar10", data_dir=tmp_path, input_shape=(16, 16, 3))


# ---------------------------------------------------------------- augmentation


def _tf_standardize(image):
    """tf.image.per_image_standardization written out for one image."""
    x = image.astype(np.float64)
    return (x - x.mean()) / max(x.std(), 1.0 / np.sqrt(x.size))


def _reference_train(images, rows, cols, flips, pad):
    """One image at a time: pad centered, crop at the drawn offset, flip, standardize."""
    height, width = images.shape[1:3]
    out = []
    for img, r, c, f in zip(images, rows, cols, flips):
        padded = np.zeros((height + pad, width + pad, img.shape[2]), img.dtype)
        padded[pad // 2:pad // 2 + height, pad // 2:pad // 2 + width] = img
        crop = padded[r:r + height, c:c + width]
        out.append(_tf_standardize(crop[:, ::-1] if f else crop))
    return np.stack(out)


@pytest.mark.parametrize("shape,pad", [((32, 32, 3), 4), ((8, 8, 1), 4), ((6, 10, 2), 3)])
def test_train_transform_matches_reference(shape, pad):
    images = np.random.default_rng(1).integers(0, 256, (16, *shape), dtype=np.uint8)
    got = train_transform(images, np.random.default_rng(7), pad=pad)
    rows, cols, flips = draw_crops_and_flips(np.random.default_rng(7), len(images), pad)
    assert got.dtype == np.float32 and got.shape == images.shape
    assert flips.any() and not flips.all() and rows.max() <= pad
    # both standardise in float32 but sum the image's mean and variance in another order
    np.testing.assert_allclose(got, _reference_train(images, rows, cols, flips, pad),
                               rtol=1e-5, atol=1e-5)


def test_pad_is_centered_zero_padding():
    images = np.full((1, 4, 4, 1), 200, np.uint8)

    class Fixed:  # crop at the top-left corner, no flip
        def integers(self, low, high, size):
            return np.zeros(size, np.int64)

        def random(self, n):
            return np.ones(n)

    out = train_transform(images, Fixed(), pad=4)[0, ..., 0]
    assert (out[:2] == out[0, 0]).all() and (out[:, :2] == out[0, 0]).all()
    assert (out[2:, 2:] == out[3, 3]).all() and out[3, 3] > out[0, 0]


def test_standardization_tf_formula_and_floor():
    image = np.random.default_rng(0).integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
    # float32 standardisation both ways, summed in another order: a few ulps
    np.testing.assert_allclose(eval_transform(image)[0], _tf_standardize(image[0]), rtol=1e-6)
    constant = np.full((2, 4, 4, 3), 9, np.uint8)
    np.testing.assert_array_equal(standardize(constant), np.zeros_like(constant, np.float32))
    # A tiny spread is divided by the 1/sqrt(n) floor, not by its own std.
    near = np.zeros((1, 2, 2, 1), np.uint8)
    near[0, 0, 0, 0] = 1
    np.testing.assert_allclose(standardize(near).ravel(), (near.ravel() - 0.25) / 0.5)


# ---------------------------------------------------------------- streams


def _synthetic(shape=(8, 8, 1), classes=4):
    return load_dataset("synthetic", input_shape=shape, num_classes=classes, seed=3)


def test_batch_stream_resume_is_bit_identical():
    ds = _synthetic()
    steps_per_epoch = len(ds.train_labels) // 100
    fresh = list(itertools.islice(BatchStream(ds, 100, seed=5), 2 * steps_per_epoch + 3))
    k = steps_per_epoch - 2  # resume just before an epoch boundary
    resumed = BatchStream(ds, 100, seed=5, start_step=k)
    for want_x, want_y in fresh[k:]:
        got_x, got_y = next(resumed)
        assert got_x.tobytes() == want_x.tobytes() and np.array_equal(got_y, want_y)
    assert resumed.state() == {"seed": 5, "step": len(fresh)}


def test_batch_stream_epochs_cover_data_and_drop_remainder():
    ds = _synthetic()
    stream = BatchStream(ds, 100, seed=0, augment=False)
    n_steps = len(ds.train_labels) // 100
    labels = np.concatenate([next(stream)[1] for _ in range(n_steps)])
    assert len(labels) == n_steps * 100
    assert len(np.unique(labels)) == 4
    other_seed = next(BatchStream(ds, 100, seed=1, augment=False))[1]
    assert not np.array_equal(other_seed, BatchStream(ds, 100, seed=0, augment=False).batch(0)[1])


def test_batch_size_larger_than_data_is_refused():
    with pytest.raises(DataError, match="batch size"):
        BatchStream(_synthetic(), 10**6, seed=0)


def test_eval_batches_keep_order_and_last_partial_batch():
    ds = _synthetic()
    batches = list(eval_batches(ds.test_images, ds.test_labels, 100))
    assert [len(y) for _, y in batches] == [100, 100, 56]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ds.test_labels)
    np.testing.assert_array_equal(batches[2][0], eval_transform(ds.test_images[200:]))


def test_prefetcher_yields_same_sequence():
    ds = _synthetic()
    plain = list(itertools.islice(BatchStream(ds, 64, seed=2), 6))
    with Prefetcher(itertools.islice(BatchStream(ds, 64, seed=2), 6), depth=3) as ahead:
        fetched = list(ahead)
    assert len(fetched) == len(plain)
    for (a, la), (b, lb) in zip(plain, fetched):
        assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)


def test_prefetcher_reraises_worker_exception():
    def failing():
        yield 1
        raise RuntimeError("disk on fire")

    ahead = Prefetcher(failing())
    assert next(ahead) == 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()


def test_prefetcher_close_stops_infinite_source():
    ahead = Prefetcher(itertools.count(), depth=2)
    assert next(ahead) == 0
    start = time.monotonic()
    ahead.close()
    assert time.monotonic() - start < 1.0
    assert not ahead._thread.is_alive()
    with pytest.raises(StopIteration):
        next(ahead)


# ---------------------------------------------------------------- digits, synthetic, fit


def test_digits_split_and_values():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", num_classes=10)
    assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    assert ds.train_images.min() == 0
    assert set(np.unique(ds.test_labels)) == set(range(10))
    again = load_dataset("digits", seed=123)  # the split does not follow the training seed
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DataError, match=r"pip install 'rescompile\[digits\]'"):
        load_dataset("digits")


def test_digits_fitted_to_cifar_input():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", input_shape=(36, 36, 3))
    raw = load_dataset("digits")
    assert ds.train_images.shape[1:] == (36, 36, 3)
    # 8 -> 32 by repeating each pixel 4x4, then 2 zero pixels on each side.
    np.testing.assert_array_equal(ds.train_images[0, 2:6, 2:6, 1], raw.train_images[0, 0, 0, 0])
    assert not ds.train_images[:, :2].any() and not ds.train_images[:, -2:].any()


def test_fit_pads_when_factor_is_not_integral():
    images = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)
    out = fit_images(images, (4, 5, 1))
    np.testing.assert_array_equal(out[0, :3, 1:4, 0], images[0, ..., 0])
    assert out.sum() == images.sum()
    with pytest.raises(DataError, match="cannot be fitted"):
        fit_images(np.zeros((1, 4, 4, 3), np.uint8), (4, 4, 1))


def test_synthetic_is_deterministic_and_class_dependent():
    a = load_dataset("synthetic", input_shape=(12, 10, 2), num_classes=3, seed=9)
    b = load_dataset("synthetic", input_shape=(12, 10, 2), num_classes=3, seed=9)
    c = load_dataset("synthetic", input_shape=(12, 10, 2), num_classes=3, seed=10)
    assert isinstance(a, Dataset) and a.train_images.dtype == np.uint8
    assert a.train_images.shape[1:] == (12, 10, 2) and a.num_classes == 3
    assert a.train_images.tobytes() == b.train_images.tobytes()
    assert a.train_images.tobytes() != c.train_images.tobytes()
    # Nearest class mean on the test split: far above chance if the classes are learnable.
    means = np.stack([a.train_images[a.train_labels == k].mean(0) for k in range(3)])
    dists = ((a.test_images[:, None].astype(float) - means) ** 2).sum(axis=(2, 3, 4))
    assert (dists.argmin(1) == a.test_labels).mean() > 0.9


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="cifar10, cifar100, digits, synthetic"):
        load_dataset("mnist")


# ---------------------------------------------------------------- one's own data


def test_crop_and_flip_turn_off_one_by_one():
    images = np.random.default_rng(1).integers(0, 256, (16, 6, 6, 3), dtype=np.uint8)
    transform = lambda **on: train_transform(images, np.random.default_rng(7), **on)  # noqa
    rows, cols, flips = draw_crops_and_flips(np.random.default_rng(7), 16, 4)
    assert np.array_equal(transform(crop=False, flip=False), eval_transform(images))
    mirrored = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    assert np.array_equal(transform(crop=False), eval_transform(mirrored))
    # Without flips the crops are the ones drawn with them: the draws do not move.
    cropped = crop_and_flip(pad_centered(images, 4), rows, cols, np.zeros(16, bool), 6, 6)
    assert np.array_equal(transform(flip=False), eval_transform(cropped))


def test_channel_normalization_uses_the_training_statistics():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (300, 4, 4, 3)).astype(np.uint8)
    images[..., 2] = 7  # a constant channel stays finite: divided by 1
    norm = Normalization.fit("channel", images)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(norm.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std[:2], flat.std(axis=0)[:2], rtol=1e-12)
    assert norm.std[2] == 1.0
    out = norm(images[:5])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (images[:5] - flat.mean(axis=0)) / np.array(norm.std),
                               rtol=1e-6)  # float32 rounding of the result
    assert Normalization.fit("image", images)(images[:2]).tobytes() == \
        eval_transform(images[:2]).tobytes()


def test_the_split_holds_out_each_class_by_its_fraction():
    labels = np.repeat(np.arange(3), [10, 20, 2])
    train, held = split(labels, 0.25, "data")
    assert np.bincount(labels[held]).tolist() == [3, 5, 1]  # rounded half up, at least one
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(32))
    assert np.array_equal(split(labels, 0.25, "data")[1], held)  # seeded, whatever the run
    with pytest.raises(DataError, match="too few images to hold out"):
        split(np.arange(4), 0.5, "data")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_arrays_with_and_without_a_held_out_set(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((40, 8, 8, 1)).astype(np.float32) * 16  # floats on their own scale
    labels = np.arange(40) % 4
    data = load_dataset("npz", _npz(tmp_path / "a.npz", images=images, labels=labels),
                        input_shape=(8, 8, 3), num_classes=4, val_fraction=0.25)
    assert data.train_images.dtype == np.float32 and data.train_images.shape == (28, 8, 8, 3)
    assert np.bincount(data.test_labels).tolist() == [3, 3, 3, 3]
    assert data.class_names is None
    path = _npz(tmp_path / "b.npz", images=images[:30], labels=labels[:30].astype(np.uint8),
                val_images=images[30:], val_labels=labels[30:])
    data = load_dataset("npz", path, input_shape=(8, 8, 1), num_classes=4)
    assert np.array_equal(data.test_images, images[30:]) and data.train_labels.dtype == np.int64
    # A stream of float images normalises like one of pixels.
    batch, _ = BatchStream(data, 10, seed=0).batch(0)
    assert batch.dtype == np.float32 and np.isfinite(batch).all()


def test_folder_with_train_and_val_folders(tmp_path):
    from pictures import SHAPES, shape_folder
    shape_folder(tmp_path / "train", per_class=3)
    shape_folder(tmp_path / "val", per_class=2, seed=1)
    (tmp_path / "val" / "green square" / "000.jpg").unlink()
    for path in (tmp_path / "val" / "red circle").iterdir():
        path.unlink()
    (tmp_path / "val" / "red circle").rmdir()  # the held-out set may lack a class
    (tmp_path / "train" / "blue cross" / "notes.txt").write_text("skipped")
    data = load_dataset("folder", tmp_path, input_shape=(8, 8, 3), num_classes=3)
    assert data.class_names == tuple(sorted(SHAPES))
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test_labels.tolist() == [0, 0, 1]


def test_files_are_read_bounded_and_regular(tmp_path):
    (tmp_path / "small").write_bytes(b"x" * 10)
    assert read_bounded(tmp_path / "small", "data", 10, "ten bytes") == b"x" * 10
    with pytest.raises(InputError, match=r"small: larger than 9 bytes, too large for a data "
                                         r"file \(nine bytes\)"):
        read_bounded(tmp_path / "small", "data", 9, "nine bytes")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="fifo: a FIFO, not a regular data file"):
        read_bounded(tmp_path / "fifo", "data", 10, "ten bytes")  # and does not block
    with pytest.raises(InputError, match=f"{tmp_path}: a directory, not a regular data file"):
        regular_file(tmp_path, "data")
    with pytest.raises(InputError, match="none: no such data file"):
        regular_file(tmp_path / "none", "data")
