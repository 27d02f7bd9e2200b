"""A training run's checkpoint directory.

Each checkpoint is a pair: `step-000123.npz` (rescompile.checkpoint.save: variables, optimizer
slots, step, spec, and what the run keeps of its data: class names, normalisation) and
`step-000123.json` beside it, the data stream's state (data set, seed, batch size,
augmentation, normalisation, held-out fraction). BatchStream's batch k is a pure function of
(seed, k), so that state plus the step resumes the data order and augmentation exactly.

Both files are written atomically, the .npz first: a .json marks a complete pair, so a crash
between the two writes leaves an .npz that is ignored, never a half checkpoint. Pruning
removes the .json first for the same reason, and only after a newer pair is complete. A run
holds the directory's `.lock` (an flock, released when the process ends however it ends), so
a second run on the same directory is refused instead of interleaving its checkpoints. The
lock is probed (read-only) before a checkpoint is chosen to resume from, and a temporary file
left by a save that was killed is removed once the lock is held.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from pathlib import Path

from .. import checkpoint, manifest
from ..data import DATASETS, DataRecord
from ..data.normalize import KINDS
from ..errors import CheckpointError, ResourceError, UsageError
from ..fileio import atomic_write, read_bounded, remove_stale_temporaries
from ..runtime import load_checkpoint
from .config import STREAM_DEFAULTS

NAME = re.compile(r"step-(\d+)\.json")
LOCK = ".lock"


STREAM_FIELDS = {"data": manifest.one_of(tuple(DATASETS)), "seed": manifest.count(),
                 "batch_size": manifest.count(least=1),
                 "augment": manifest.boolean(), "step": manifest.count()}
# Fields a stream state gained later, each with the value it had before: data-parallel ranks,
# the augmentations one by one, the normalisation, the held-out fraction.
LATER_FIELDS = {
    "ranks": (manifest.count(least=1), 1),
    "crop": (manifest.boolean(), STREAM_DEFAULTS["crop"]),
    "flip": (manifest.boolean(), STREAM_DEFAULTS["flip"]),
    "normalize": (manifest.one_of(KINDS), STREAM_DEFAULTS["normalize"]),
    "val_fraction": ((lambda v: type(v) is float and 0 < v < 1, "a number between 0 and 1"),
                     STREAM_DEFAULTS["val_fraction"]),
}


class CheckpointDir:
    def __init__(self, path, keep: int = 3):
        if keep < 1:
            raise UsageError(f"--keep must be >= 1, got {keep}")
        self.path = Path(path)
        self.keep = keep
        self._lock = None
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: --checkpoint must be a directory")

    def hold(self) -> None:
        """Before the first step: make the directory, check it can be written, and take its
        lock, so neither a read-only directory nor a second run is found after the work."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.path).close()
            if (self.path / LOCK).exists() and not (self.path / LOCK).is_file():
                raise OSError(f"{LOCK} is not a regular file")  # a FIFO would block the open
            lock = open(self.path / LOCK, "a+")
        except OSError as exc:
            raise ResourceError(f"{self.path}: checkpoint directory cannot be written "
                                f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise self._in_use() from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        # Held, so no live run of ours writes here: a temporary file is a killed save's.
        remove_stale_temporaries(self.path)

    def check_free(self) -> None:
        """Refuse a directory another run holds, without taking it or writing anything: a
        run that resumes must not choose a checkpoint that run is about to prune."""
        if not (self.path / LOCK).is_file():
            return  # never held (or not a file: hold() will say)
        try:
            probe = open(self.path / LOCK, "rb")
        except OSError:
            return  # not readable: hold() will say
        with probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise self._in_use() from None

    def _in_use(self) -> ResourceError:
        try:
            holder = (self.path / LOCK).read_text(errors="replace").strip()[:20] or "unknown"
        except OSError:
            holder = "unknown"
        return ResourceError(f"{self.path}: in use by another training run (pid {holder}); "
                             f"wait for it or choose another directory")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def paths(self, step: int) -> tuple[Path, Path]:
        stem = self.path / f"step-{step:06d}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = (NAME.fullmatch(p.name) for p in self.path.iterdir())
        steps = (int(m.group(1)) for m in found if m)
        return sorted(s for s in steps if self.paths(s)[0].is_file())

    def newest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, exe, stream_state: dict, data: dict | None = None) -> Path:
        """The pair for exe's step; `data` is what the run keeps of its data (a
        DataRecord's dict) in the .npz."""
        weights, state = self.paths(exe.step)
        checkpoint.save(exe, weights, data)
        text = json.dumps({**stream_state, "step": exe.step}, indent=2) + "\n"
        atomic_write(state, lambda f: f.write(text.encode()))
        self._prune()
        return weights

    def stream_state(self, step: int) -> dict:
        """The data stream's settings saved beside the checkpoint, every field checked; a
        field of LATER_FIELDS takes its earlier value where it is absent."""
        path = self.paths(step)[1]
        data = read_bounded(path, "data stream state", manifest.MAX_MANIFEST_BYTES,
                            "a few lines of JSON", CheckpointError)
        state = manifest.parse(path, data)
        fields = dict(STREAM_FIELDS)
        if isinstance(state, dict):
            fields.update({k: check for k, (check, _) in LATER_FIELDS.items() if k in state})
        earlier = {k: value for k, (_, value) in LATER_FIELDS.items()}
        return {**earlier, **manifest.check(path, state, fields)}

    def _prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            weights, state = self.paths(step)
            state.unlink()
            weights.unlink(missing_ok=True)


def resolve(path) -> Path:
    """A checkpoint file as given, or the newest complete one in a directory."""
    path = Path(path)
    if path.is_dir():
        step = CheckpointDir(path).newest()
        if step is None:
            raise CheckpointError(f"{path}: no checkpoint step-*.npz (with its .json) in this "
                                  f"directory")
        return CheckpointDir(path).paths(step)[0]
    return path


def load_for_spec(path, spec, mode: str, backend: str, fresh_optimizer: bool = False,
                  dtype: str | None = None, **options):
    """An executable restored from `path`, which must hold exactly `spec`, compiled in `dtype`
    (None: the checkpoint's).

    Shapes are checked first, so a mismatch names the tensor and both shapes; any other
    difference names the first spec field that differs, not only that the specs do."""
    manifest, variables = checkpoint.read(path)
    saved = checkpoint.saved_spec(path, manifest)
    if mode == "infer":
        spec = inference_spec(spec, saved)
    checkpoint.check_variables(path, variables, spec, manifest["dtype"], mode, fresh_optimizer)
    # Compared as specs, so one saved before a field existed holds that field's default.
    field = first_difference(saved.to_dict(), spec.to_dict())
    if field is not None:
        name, saved, given = field
        raise CheckpointError(f"{path}: checkpoint was trained with {name} = {saved}, the "
                              f"given spec {spec.name!r} has {given}")
    return load_checkpoint(path, spec=spec, mode=mode, backend=backend,
                           fresh_optimizer=fresh_optimizer, dtype=dtype, **options)


def inference_spec(given, saved):
    """`given` with the [train] table of `saved`: inference does not depend on how the weights
    were trained, and a run may have changed its recipe with flags."""
    return given.replace(train=saved.to_dict()["train"])


def data_record(path, spec) -> DataRecord:
    """What the checkpoint at `path` keeps of its data, for a model of `spec`; the default
    (no class names, per-image standardisation) for one that keeps nothing."""
    saved = checkpoint.saved_data(path)
    if saved is None:
        return DataRecord()
    return DataRecord.from_dict(path, saved, spec.model.num_classes, spec.model.input[2])


def first_difference(saved, given, name: str = ""):
    """(dotted field name, saved value, given value) of the first difference between two
    specs' dicts, the values as JSON, or None."""
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in sorted(set(saved) | set(given)):
            found = first_difference(saved.get(key), given.get(key), f"{name}.{key}".lstrip("."))
            if found:
                return found
        return None
    return None if saved == given else (name, json.dumps(saved), json.dumps(given))
