"""Nothing is lost when the machine fails under a run: a full disk under `--log` saves a
checkpoint and exits 6 in one line; an existing log is never truncated; the temporary files of
a save killed with `kill -9` and the private caches of processes that fell back are removed;
a read-only cache is refused in one line. The full and read-only file systems are small
tmpfs mounts (the test runs as root in CI; elsewhere these tests skip, saying why)."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest

import rescompile as rc
from conftest import ROOT, tiny_spec
from rescompile.cli import main
from rescompile.kernel_cache import RECORD

TRAIN = ["--data", "synthetic", "--backend", "reference", "--batch-size", "16", "--seed", "1"]


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.toml"
    path.write_text(tiny_spec().to_toml())
    return path


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at `path` for the block; skip the test where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_full_disk_under_the_log_saves_a_checkpoint_and_exits_6(spec_path, tmp_path, capsys):
    """The log on a one-page file system of its own (about 35 records), the checkpoints
    elsewhere: the run stops at the step whose record does not fit, with that step saved."""
    with tmpfs(tmp_path / "small", "size=4k") as small:
        code, err = run(["train", spec_path, *TRAIN, "--steps", 200, "--log", small / "m.jsonl",
                         "--checkpoint", tmp_path / "ck", "--checkpoint-every", 1000], capsys)
        logged = (small / "m.jsonl").read_text().splitlines()
    last = err.strip().splitlines()[-1]
    assert code == 6 and "m.jsonl: cannot write (No space left on device)" in last, err
    saved = sorted(p.name for p in (tmp_path / "ck").glob("step-*.npz"))
    assert len(saved) == 1 and f"saved {tmp_path / 'ck' / saved[0]}" in err
    step = int(saved[0][5:11])
    assert 20 < step < 200 and len(logged) in (step - 1, step)  # the last line may be torn
    assert rc.load(tmp_path / "ck" / saved[0]).step == step


def test_an_existing_log_is_continued_or_replaced_never_truncated(spec_path, tmp_path,
                                                                  capsys):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "loss": 9.0}\n')
    code, err = run(["train", spec_path, *TRAIN, "--steps", 1, "--log", log], capsys)
    assert code == 2 and "pass --resume to continue its run, or --overwrite-log" in err
    assert log.read_text() == '{"step": 1, "loss": 9.0}\n'
    assert run(["train", spec_path, *TRAIN, "--steps", 2, "--log", log, "--overwrite-log",
                "--checkpoint", tmp_path / "ck"], capsys)[0] == 0
    first = log.read_text().splitlines()
    # the stale line's loss, 9.0, in no line (as a substring it can occur in a throughput)
    assert len(first) == 2 and all(json.loads(line)["loss"] != 9.0 for line in first)
    assert run(["train", spec_path, *TRAIN, "--steps", 3, "--log", log, "--resume",
                "--checkpoint", tmp_path / "ck"], capsys)[0] == 0
    assert log.read_text().splitlines()[:2] == first  # appended after the checkpoint's step


def test_temporary_files_of_a_killed_save_are_removed(spec_path, tmp_path, capsys):
    """What `kill -9` during a save leaves: `.step-N.npz.<host>-<pid>.<random>.tmp`. The next
    run that holds the directory removes it (of a step it does not write itself); a live
    writer's (this process) is kept."""
    ck = tmp_path / "ck"
    assert run(["train", spec_path, *TRAIN, "--steps", 1, "--checkpoint", ck], capsys)[0] == 0
    host = socket.gethostname()
    stale = ck / f".step-000007.npz.{host}-{dead_pid()}.k9x2ab3c.tmp"
    live = ck / f".step-000002.npz.{host}-{os.getpid()}.a1b2c3d4.tmp"
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    assert run(["train", spec_path, *TRAIN, "--steps", 2, "--checkpoint", ck, "--resume"],
               capsys)[0] == 0
    assert not stale.exists() and live.exists()


def test_fallback_caches_are_removed(tmp_path):
    """A process whose cache directory cannot be written caches in a private directory,
    removed when it exits; one left by a killed process is removed by the next fallback."""
    left = tmp_path / f"rescompile-cache-{dead_pid()}-abc123"
    left.mkdir()
    (left / "kernel.o").write_bytes(b"x")
    script = ("import warnings; warnings.simplefilter('ignore')\n"
              "from rescompile.kernel_cache import cache_root\n"
              "print(cache_root('/proc/no-cache-here'))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    used = done.stdout.strip()
    assert done.returncode == 0 and used.startswith(str(tmp_path / "rescompile-cache-")), done
    assert not os.path.exists(used) and not left.exists()


def test_clearing_a_read_only_cache_is_one_line(tmp_path, capsys):
    with tmpfs(tmp_path / "cache", "size=64k") as cache:
        (cache / "objects").mkdir()
        (cache / "objects" / "k.o").write_bytes(b"x")
        (cache / RECORD).write_text("objects/k.o\n")
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        code, err = run(["cache", "clear", "--dir", cache], capsys)
        assert (cache / "objects" / "k.o").exists()
    assert code == 6 and "k.o: cannot remove it (Read-only file system)" in err
    assert err.count("\n") == 1
