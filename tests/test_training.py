"""Training behaviour: memorising a batch, backward(dlogits), learning-rate schedule,
checkpoints that resume bit-identically and refuse bad files."""

import numpy as np
import pytest

import rescompile as rc
from conftest import tiny_spec


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 8, 8, 3)).astype(np.float32), rng.integers(0, 5, 8)


def test_momentum_memorises_a_batch(batch):
    spec = tiny_spec().replace(train={"learning_rate": [[0, 0.05]]})
    exe = rc.compile(spec, mode="train", dtype="float32", seed=1)
    losses = [exe.train_step(*batch) for _ in range(200)]
    assert losses[-1] < 0.05 * losses[0]
    assert exe.step == 200


def test_sgd_step_is_w_minus_lr_grad(batch):
    spec = tiny_spec().replace(train={"optimizer": "sgd", "learning_rate": [[0, 0.3]]})
    exe = rc.compile(spec, mode="train", dtype="float64", seed=1)
    before = {n: v.copy() for n, v in exe.params.items()}
    _, grads = exe.loss_and_grads(*batch)
    exe.train_step(*batch)
    for name, grad in grads.items():
        if name != "images":
            # one float64 multiply-subtract each side: at most an ulp of the weights (< 1)
            np.testing.assert_allclose(exe.params[name], before[name] - 0.3 * grad, rtol=0,
                                       atol=1e-15)


def test_backward_is_the_vjp_of_the_logits(batch):
    """backward(d(xent)/d(logits)) equals loss_and_grads minus the weight-decay term."""
    spec = tiny_spec()
    exe = rc.compile(spec, mode="train", dtype="float64", seed=2)
    images, labels = batch
    _, full = exe.loss_and_grads(images, labels)
    logits = exe.forward(images)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dlogits = (probs - np.eye(5)[labels]) / len(labels)
    grads = exe.backward(dlogits)
    assert set(grads) == set(full)
    decay = spec.train.weight_decay
    for name, grad in grads.items():
        expected = full[name] - decay * exe.params[name] if name.endswith("/DW") else full[name]
        # float64; the softmax gradient is computed here in another order than the loss's
        np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-12)


def test_backward_needs_a_train_forward(batch):
    exe = rc.compile(tiny_spec(), mode="train")
    with pytest.raises(RuntimeError, match="forward"):
        exe.backward(np.zeros((8, 5), np.float32))
    infer = rc.compile(tiny_spec(), mode="infer")
    infer.forward(batch[0])
    with pytest.raises(RuntimeError, match="mode='train'"):
        infer.backward(np.zeros((8, 5), np.float32))
    with pytest.raises(RuntimeError, match="mode='train'"):
        infer.train_step(*batch)


def test_forward_does_not_move_statistics(batch):
    exe = rc.compile(tiny_spec(), mode="train")
    before = {n: v.copy() for n, v in exe.params.items()}
    exe.forward(batch[0])
    assert all(np.array_equal(before[n], exe.params[n]) for n in before)
    exe.train_step(*batch)
    moved = [n for n in before if "moving" in n and not np.array_equal(before[n], exe.params[n])]
    assert moved


def test_learning_rate_schedule_follows_the_step():
    spec = tiny_spec().replace(train={"learning_rate": [[0, 0.1], [2, 0.01]]})
    exe = rc.compile(spec, mode="train")
    rates = []
    for _ in range(3):
        rates.append(exe.learning_rate())
        exe.step += 1
    assert rates == [0.1, 0.1, 0.01]


@pytest.mark.parametrize("zero_debias", [False, True])
def test_save_load_resumes_bit_identically(tmp_path, batch, zero_debias):
    spec = tiny_spec().replace(batch_norm={"zero_debias": zero_debias})
    straight = rc.compile(spec, mode="train", seed=3)
    for _ in range(2):
        straight.train_step(*batch)
    straight.save(tmp_path / "ckpt.npz")
    resumed = rc.load(tmp_path / "ckpt.npz")
    assert resumed.step == 2 and resumed.mode == "train"
    for _ in range(2):
        assert straight.train_step(*batch) == resumed.train_step(*batch)
    for name, value in straight.state.items():
        assert np.array_equal(value, resumed.state[name]), name


def test_checkpoint_loads_into_an_infer_executable(tmp_path, batch):
    exe = rc.compile(tiny_spec(), mode="train", seed=3)
    exe.train_step(*batch)
    exe.save(tmp_path / "ckpt.npz")
    infer = rc.load(tmp_path / "ckpt.npz", mode="infer")
    reference = rc.compile(tiny_spec(), mode="infer")
    reference.load_params(exe.params)
    np.testing.assert_array_equal(infer.forward(batch[0]), reference.forward(batch[0]))


def test_truncated_and_corrupt_checkpoints_are_refused(tmp_path, batch):
    exe = rc.compile(tiny_spec(), mode="train")
    path = tmp_path / "ckpt.npz"
    exe.save(path)
    data = path.read_bytes()
    (tmp_path / "short.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(rc.CheckpointError, match="short.npz: corrupt archive"):
        rc.load(tmp_path / "short.npz")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(rc.CheckpointError, match="flip.npz"):
        rc.load(tmp_path / "flip.npz")
    with pytest.raises(rc.CheckpointError, match="no such checkpoint"):
        rc.load(tmp_path / "missing.npz")


def test_checkpoint_of_another_spec_is_refused(tmp_path):
    exe = rc.compile(tiny_spec(), mode="train")
    exe.save(tmp_path / "ckpt.npz")
    other = tiny_spec(num_classes=7)
    with pytest.raises(rc.CheckpointError, match="differs from the given spec"):
        rc.load(tmp_path / "ckpt.npz", spec=other)


def test_save_is_atomic(tmp_path, monkeypatch, batch):
    """A failing write leaves the previous checkpoint intact and no temporary file behind."""
    exe = rc.compile(tiny_spec(), mode="train")
    path = tmp_path / "ckpt.npz"
    exe.save(path)
    before = path.read_bytes()
    exe.train_step(*batch)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(rc.ResourceError, match="ckpt.npz: cannot write"):
        exe.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
