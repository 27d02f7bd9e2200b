"""Every public method of `Executable`, on one backend, against the float64 reference backend:
forward in both modes, backward, loss_and_grads, train_step, the train step in halves,
params/load_params, state/load_state, learning_rate and save/load, each checked on the numbers.
tests/test_api_parity.py runs it on reference and cpu, tests/cuda/test_api_parity.py on cuda.

Tolerances, relative to the tensor's largest entry: float32 5e-5, for float32 rounding through
about 20 layers of sums over a few hundred terms, with batch statistics of 64 pixels (measured
up to 4.4e-6 on reference and cpu); float64 1e-10, the same at float64's epsilon with room for
reassociated reductions (measured 1.0e-14).
"""

import numpy as np

import rescompile as rc
from conftest import random_bn_state, rel_err, tiny_spec

TOLERANCE = {"float32": 5e-5, "float64": 1e-10}
BATCH = 3


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, 8, 8, 3)) * 1.5 + 0.2, rng.integers(0, 5, BATCH)


def _pair(mode, backend, dtype):
    """The backend's executable and the float64 reference, with the same non-trivial state."""
    exe = rc.compile(tiny_spec(), mode=mode, backend=backend, dtype=dtype, seed=3)
    exe.load_params(random_bn_state(exe, seed=4))
    reference = rc.compile(tiny_spec(), mode=mode, backend="reference", dtype="float64")
    reference.load_state(exe.state)
    return exe, reference


def _close(got, want, tol, what):
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), what
        for name in want:
            _close(got[name], want[name], tol, f"{what}[{name}]")
        return
    assert rel_err(got, want) <= tol, f"{what}: {rel_err(got, want):.2e}"


def check_infer(backend, dtype, tmp_path):
    exe, reference = _pair("infer", backend, dtype)
    tol = TOLERANCE[dtype]
    images, _ = _batch()
    _close(exe.forward(images), reference.forward(images), tol, "infer forward")
    params = {n: np.asarray(v) * 1.1 for n, v in exe.params.items()}
    exe.load_params(params)
    reference.load_params(params)
    _close(exe.forward(images), reference.forward(images), tol, "forward after load_params")
    exe.save(tmp_path / "infer.npz")
    again = rc.load(tmp_path / "infer.npz", backend=backend)
    assert np.array_equal(again.forward(images), exe.forward(images))


def check_train(backend, dtype, tmp_path):
    exe, reference = _pair("train", backend, dtype)
    tol = TOLERANCE[dtype]
    images, labels = _batch()
    _close(exe.forward(images), reference.forward(images), tol, "train forward")
    dlogits = np.random.default_rng(5).standard_normal((BATCH, 5))
    _close(exe.backward(dlogits), reference.backward(dlogits), tol, "backward")
    loss, grads = exe.loss_and_grads(images, labels)
    want_loss, want_grads = reference.loss_and_grads(images, labels)
    _close(loss, want_loss, tol, "loss")
    _close(grads, want_grads, tol, "loss_and_grads")
    halves = rc.compile(tiny_spec(), mode="train", backend=backend, dtype=dtype)
    halves.load_state(exe.state)
    assert exe.learning_rate() == reference.learning_rate() == halves.learning_rate()
    assert exe.train_step(images, labels) == _halves_step(halves, images, labels)
    reference.train_step(images, labels)
    _close(exe.state, reference.state, tol, "state after train_step")
    for name, value in exe.state.items():
        assert np.array_equal(halves.state[name], value), f"halves: {name}"
    exe.save(tmp_path / "train.npz")
    again = rc.load(tmp_path / "train.npz", backend=backend)
    assert again.step == exe.step == 1
    next_batch = _batch(1)
    assert again.train_step(*next_batch) == exe.train_step(*next_batch)


def _halves_step(exe, images, labels) -> float:
    loss, grads, statistics = exe.step_gradients(images, labels)
    exe.apply_gradients(grads, statistics)
    return loss
