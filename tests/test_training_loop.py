"""The training package's parts: checkpoint directory, settings on resume, default length,
progress display, metrics log, backend choice."""

import io
import json
import types

import pytest

import rescompile as rc
import rescompile.backends
from conftest import tiny_spec
from rescompile.errors import CheckpointError
from rescompile.training import CheckpointDir, TrainConfig, default_backend, resolve
from rescompile.training.config import stream_settings, target_steps
from rescompile.training.metrics import MetricsLog
from rescompile.training.progress import LINES, Progress

STATE = {"data": "synthetic", "seed": 1, "batch_size": 8, "augment": True}


def saved_dir(path, steps, keep=2):
    directory = CheckpointDir(path, keep=keep)
    exe = rc.compile(tiny_spec(), mode="train")
    for step in steps:
        exe.step = step
        directory.save(exe, STATE)
    return directory


def test_checkpoint_dir_keeps_the_newest_pairs(tmp_path):
    directory = saved_dir(tmp_path, [10, 20, 30])
    assert directory.steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000020.json", "step-000020.npz", "step-000030.json", "step-000030.npz"]
    # Saved before data-parallel training and the later stream settings existed: one rank,
    # both augmentations, per-image standardization, the default held-out fraction.
    assert directory.stream_state(30) == {"ranks": 1, "crop": True, "flip": True,
                                          "normalize": "image", "val_fraction": 0.1,
                                          **STATE, "step": 30}
    assert resolve(tmp_path) == tmp_path / "step-000030.npz"


@pytest.mark.parametrize("field, value, words", [
    ("seed", "1", "field 'seed' must be an integer >= 0"),
    ("data", "imagenet", "field 'data' must be one of"),
    ("ranks", 0, "field 'ranks' must be an integer >= 1"),
    ("normalize", "batch", "field 'normalize' must be one of \"image\", \"channel\""),
    ("val_fraction", 1.0, "field 'val_fraction' must be a number between 0 and 1"),
    ("extra", 1, "field 'extra' is unknown")])
def test_a_bad_stream_state_is_refused_naming_the_field(tmp_path, field, value, words):
    directory = saved_dir(tmp_path, [10])
    path = tmp_path / "step-000010.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(CheckpointError, match=words):
        directory.stream_state(10)


def test_an_npz_without_its_json_is_not_a_checkpoint(tmp_path):
    """A crash between the two writes leaves the .npz alone; it must not be resumed from."""
    directory = saved_dir(tmp_path, [10, 20])
    directory.paths(20)[1].unlink()
    assert directory.newest() == 10
    directory.paths(10)[1].unlink()
    with pytest.raises(CheckpointError, match="no checkpoint step-"):
        resolve(tmp_path)


def test_resume_takes_the_saved_stream_settings():
    config = TrainConfig(spec=tiny_spec(), data="synthetic")
    later = {"crop": True, "flip": True, "normalize": "image", "val_fraction": 0.1}
    assert stream_settings(config, None) == {"data": "synthetic", "seed": 0,
                                             "batch_size": 128, "augment": True, **later}
    saved = {**STATE, **later, "normalize": "channel", "crop": False}
    assert stream_settings(config, {**saved, "step": 5}) == saved
    config.batch_size = 16
    with pytest.raises(CheckpointError, match="--batch-size 16 differs from the checkpoint's 8"):
        stream_settings(config, saved)
    config.batch_size, config.normalize = None, "image"
    with pytest.raises(CheckpointError, match="--normalize image differs from the checkpoint's "
                                              "channel"):
        stream_settings(config, saved)


def test_digits_are_not_augmented_by_default():
    config = TrainConfig(spec=rc.preset("digits"), data="digits")
    assert stream_settings(config, None)["augment"] is False


def test_default_length_follows_the_schedule():
    digits = TrainConfig(spec=rc.preset("digits"), data="digits")
    assert target_steps(digits, steps_per_epoch=22) == 2 * rc.preset("digits").train \
        .learning_rate[-1][0]
    flat = TrainConfig(spec=tiny_spec().replace(train={"learning_rate": [[0, 0.1]]}),
                       data="synthetic")
    assert target_steps(flat, steps_per_epoch=7) == 70
    flat.epochs = 2
    assert target_steps(flat, steps_per_epoch=7) == 14
    cosine = TrainConfig(spec=tiny_spec().replace(train={
        "learning_rate": [[0, 0.1]], "schedule": "cosine", "total_steps": 30}), data="synthetic")
    assert target_steps(cosine, steps_per_epoch=7) == 30  # the schedule's own length
    flat.steps = 5
    with pytest.raises(ValueError, match="not both"):
        target_steps(flat, steps_per_epoch=7)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_one_line_on_a_terminal():
    out = Terminal()
    progress = Progress(total=3, start=0, batch_size=10, out=out)
    for step in (1, 2, 3):
        progress.update(step, loss=1.0, lr=0.1, step_s=0.5)
    progress.note("step 3: test accuracy 50.00% (1/2)")
    text = out.getvalue()
    assert text.startswith("\rstep 1/3 [") and "20 img/s" in text
    assert text.endswith("\nstep 3: test accuracy 50.00% (1/2)\n")
    assert text.count("\n") == 2  # the redrawn line, closed once, and the note


def test_progress_prints_a_line_every_few_percent_elsewhere():
    out = io.StringIO()
    progress = Progress(total=1000, start=0, batch_size=10, out=out)
    for step in range(1, 1001):
        progress.update(step, loss=1.0, lr=0.1, step_s=0.01)
    lines = out.getvalue().splitlines()
    assert len(lines) == LINES and lines[-1].startswith("step 1000/1000 [")
    assert lines[-1].endswith("ETA 0:00:00") and "\r" not in out.getvalue()


def test_metrics_log_resumes_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    log.close()
    resumed = MetricsLog(path, resume_step=2)  # step 3 ran after the checkpoint
    resumed.write({"step": 3, "loss": 0.5})
    resumed.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    assert [r["step"] for r in resumed.records] == [1, 2, 3]


def test_default_backend_is_cpu_once_it_compiles(monkeypatch):
    """The CPU backend is being written: it is the default only once it compiles programs."""
    unfinished = types.ModuleType("rescompile.backends.cpu")
    monkeypatch.setattr(rescompile.backends, "cpu", unfinished, raising=False)
    assert default_backend() == "reference"
    unfinished.compile_program = lambda *args, **options: None
    assert default_backend() == "cpu"
