"""`rescompile train`, `eval` and `predict` in-process on a tiny spec and synthetic data:
bit-identical resume (after a clean stop and after Ctrl-C), refused runs that leave the
checkpoint directory untouched, progress, metrics log, plot, evaluation and prediction."""

import json
import sys

import numpy as np
import pytest

from conftest import tiny_spec
from rescompile import checkpoint
from rescompile.cli import main
from rescompile.data import load_dataset
from rescompile.runtime import Executable

# 1024 synthetic images in batches of 160: 6 steps an epoch, so 8 steps cross an epoch and
# the learning-rate decay at step 5, and a resume at step 4 replays both.
SPEC = tiny_spec().replace(train={"learning_rate": [[0, 0.1], [5, 0.02]]})
BASE = ["--data", "synthetic", "--backend", "reference", "--batch-size", "160", "--seed", "3"]


def spec_file(directory, spec=SPEC):
    path = directory / f"{spec.name}-{spec.digest()[:8]}.toml"
    path.write_text(spec.to_toml())
    return str(path)


def train(spec_path, *args):
    return main(["train", spec_path, *BASE, *map(str, args)])


def variables(path):
    return checkpoint.read(path)[1]


def assert_identical(a, b):
    va, vb = variables(a), variables(b)
    assert sorted(va) == sorted(vb)
    for name in va:
        assert np.array_equal(va[name], vb[name]), name


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A spec file and a directory trained 8 steps in one go."""
    root = tmp_path_factory.mktemp("trained")
    path = spec_file(root)
    assert train(path, "--steps", 8, "--checkpoint", root / "ck") == 0
    return path, root / "ck"


def test_resume_is_bit_identical(trained, tmp_path):
    path, full = trained
    half = tmp_path / "half"
    assert train(path, "--steps", 4, "--checkpoint", half) == 0
    assert train(path, "--steps", 8, "--checkpoint", half, "--resume") == 0
    assert_identical(full / "step-000008.npz", half / "step-000008.npz")


def test_ctrl_c_saves_and_resumes_bit_identically(trained, tmp_path, monkeypatch, capsys):
    path, full = trained
    real_step = Executable.train_step

    def interrupted(self, images, labels):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, images, labels)

    monkeypatch.setattr(Executable, "train_step", interrupted)
    assert train(path, "--steps", 8, "--checkpoint", tmp_path) == 130
    assert "interrupted at step 3" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000003.json",
                                                          "step-000003.npz"]
    monkeypatch.setattr(Executable, "train_step", real_step)
    assert train(path, "--steps", 8, "--checkpoint", tmp_path, "--resume") == 0
    assert_identical(full / "step-000008.npz", tmp_path / "step-000008.npz")


def refused(capsys, argv, message, directory, code=5):
    before = snapshot(directory)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert snapshot(directory) == before


def test_checkpoint_of_another_spec_is_refused(trained, tmp_path, capsys):
    path, ck = trained
    other = spec_file(tmp_path, SPEC.replace(name="other"))
    refused(capsys, ["train", other, *BASE, "--checkpoint", str(ck), "--resume"],
            "checkpoint was trained with name = \"tiny\", the given spec 'other' has \"other\"",
            ck)


def test_checkpoint_of_another_schedule_names_the_field(trained, tmp_path, capsys):
    """Resuming needs the recipe the checkpoint was trained with; evaluating does not (a run
    may have changed its recipe with flags)."""
    path, ck = trained
    slower = spec_file(tmp_path, SPEC.replace(train={"learning_rate": [[0, 0.1]]}))
    refused(capsys, ["train", slower, *BASE, "--checkpoint", str(ck), "--resume"],
            "trained with train.learning_rate = [[0, 0.1], [5, 0.02]], the given spec 'tiny' "
            "has [[0, 0.1]]", ck)
    assert main(["eval", slower, "--checkpoint", str(ck), "--data", "synthetic",
                 "--backend", "reference"]) == 0


@pytest.mark.parametrize("command", ["train", "eval"])
def test_shape_mismatch_names_the_tensor(trained, tmp_path, capsys, command):
    path, ck = trained
    wider = spec_file(tmp_path, tiny_spec(stem_filters=6).replace(train=SPEC.train))
    extra = ["--resume", *BASE] if command == "train" else ["--data", "synthetic",
                                                             "--backend", "reference"]
    refused(capsys, [command, wider, "--checkpoint", str(ck), *extra],
            "variable 'init/init_conv/DW' has shape [3, 3, 3, 4], spec 'tiny' needs "
            "[3, 3, 3, 6]", ck)


def test_bad_data_directory_is_refused(trained, tmp_path, capsys):
    path, _ = trained
    cifar = spec_file(tmp_path, tiny_spec(input=[32, 32, 3], num_classes=10))
    log = tmp_path / "log.jsonl"
    refused(capsys, ["train", cifar, "--data", "cifar10", "--data-dir", str(tmp_path / "nope"),
                     "--backend", "reference", "--checkpoint", str(tmp_path / "ck"),
                     "--log", str(log)],
            "does not exist", tmp_path, code=4)


@pytest.mark.parametrize("extra, message", [
    ([], "already holds checkpoints (newest: step 8); pass --resume"),
    (["--resume", "--seed", "4"], "--seed 4 differs from the checkpoint's 3"),
])
def test_runs_that_would_clobber_a_directory_are_refused(trained, capsys, extra, message):
    path, ck = trained
    # A repeated option's last value wins: here --seed 4 over BASE's --seed 3.
    refused(capsys, ["train", path, *BASE, "--checkpoint", str(ck), *extra], message, ck)


def test_progress_log_and_plot(trained, tmp_path, capsys):
    path, _ = trained
    log, png = tmp_path / "m.jsonl", tmp_path / "m.png"
    assert train(path, "--steps", 4, "--eval-every", 2, "--log", log, "--plot", png) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("step 4/4")]
    assert progress and "loss" in progress[0] and "img/s" in progress[0] and "ETA" in progress[0]
    assert "\r" not in captured.err  # not a terminal: plain lines
    assert "test accuracy" in captured.out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [("accuracy" in r) for r in records] == [False, True, False, True]
    assert records[0]["lr"] == 0.1 and records[0]["images_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so_and_goes_on(trained, tmp_path, capsys, monkeypatch):
    path, _ = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert train(path, "--steps", 1, "--plot", tmp_path / "m.png") == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_eval_prints_accuracy_and_confusion_matrix(trained, capsys):
    path, ck = trained
    assert main(["eval", path, "--checkpoint", str(ck), "--data", "synthetic",
                 "--backend", "reference"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny at step 8 on synthetic test: accuracy")
    assert lines[1].split() == ["true\\pred", "0", "1", "2", "3", "4"]
    assert sum(sum(map(int, line.split()[1:])) for line in lines[2:]) == 256


def test_predict_uint8_and_float_images_agree(trained, tmp_path, capsys):
    path, ck = trained
    data = load_dataset("synthetic", input_shape=(8, 8, 3), num_classes=5)
    np.save(tmp_path / "raw.npy", data.test_images[:6])
    from rescompile.data.augment import eval_transform
    np.save(tmp_path / "std.npy", eval_transform(data.test_images[:6]))
    common = ["predict", path, "--checkpoint", str(ck / "step-000008.npz"),
              "--backend", "reference"]
    assert main([*common, str(tmp_path / "raw.npy"), "--top", "2",
                 "-o", str(tmp_path / "p.json")]) == 0
    assert main([*common, str(tmp_path / "std.npy"), "-o", str(tmp_path / "p.npy")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    probabilities = np.load(tmp_path / "p.npy")
    assert len(rows) == 6 and probabilities.shape == (6, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)  # float32 softmax
    for row, p in zip(rows, probabilities):
        assert row["classes"] == np.argsort(-p)[:2].tolist()
        assert row["probabilities"][0] >= row["probabilities"][1]
    assert rows[0]["input"] == f"{tmp_path / 'raw.npy'}[0]"
    assert main([*common, str(tmp_path / "raw.npy")]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        f"{tmp_path / 'raw.npy'}[0]: {rows[0]['classes'][0]} (")
