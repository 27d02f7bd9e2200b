"""Bad run-time inputs get a clear error naming the tensor, before any kernel runs."""

import numpy as np
import pytest

import rescompile as rc
from conftest import tiny_spec


@pytest.fixture(scope="module")
def exe():
    return rc.compile(tiny_spec(), mode="train")


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 4), np.float32), r"images: expected shape \[N, 8, 8, 3\]"),
    (np.zeros((8, 8, 3), np.float32), r"images: expected rank 4"),
    (np.zeros((2, 8, 8, 3), np.int64), r"images: dtype int64 is not a float type"),
    (np.zeros((0, 8, 8, 3), np.float32), r"images: expected shape"),
    ([["not", "numbers"]], r"images: dtype <U7 is not a float type"),
])
def test_bad_images(exe, images, message):
    with pytest.raises(rc.InputError, match=message):
        exe.forward(images)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), r"labels: expected 2 class ids, got 3"),
    (np.array([0, 5]), r"labels: class ids must be in \[0, 5\)"),
    (np.zeros((2, 4), np.float32), r"labels: expected shape \[2, 5\]"),
    (np.zeros((2, 1, 1)), r"labels: expected int class ids"),
])
def test_bad_labels(exe, labels, message):
    with pytest.raises(rc.InputError, match=message):
        exe.train_step(np.zeros((2, 8, 8, 3), np.float32), labels)


def test_load_params_names_the_tensor(exe):
    params = dict(exe.params)
    params["init/init_conv/DW"] = np.zeros((3, 3, 3, 5))
    with pytest.raises(rc.InputError, match=r"'init/init_conv/DW': expected shape \[3, 3, 3, 4\]"):
        exe.load_params(params)
    with pytest.raises(rc.InputError, match="unknown variable 'nope'"):
        exe.load_params({**exe.params, "nope": np.zeros(1)})
    partial = dict(exe.params)
    partial.pop("logit/biases")
    with pytest.raises(rc.InputError, match="missing variable 'logit/biases'"):
        exe.load_params(partial)


def test_failed_load_changes_nothing(exe):
    before = {n: v.copy() for n, v in exe.params.items()}
    bad = {n: v + 1 for n, v in exe.params.items()}
    bad["logit/DW"] = np.zeros((1, 1))
    with pytest.raises(rc.InputError):
        exe.load_params(bad)
    assert all(np.array_equal(before[n], exe.params[n]) for n in before)


def test_float64_images_are_accepted_by_a_float32_executable(exe):
    images = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    np.testing.assert_array_equal(exe.forward(images), exe.forward(images.astype(np.float32)))
