"""The metrics log: one JSON object per line (step, loss, lr, images_per_s, and accuracy after
an evaluation), flushed as training goes so that it can be followed with `tail -f`.

An existing log is never truncated: a resumed run keeps the records up to the checkpoint's
step and appends after them (records of steps done after that checkpoint, before a crash,
are replayed by the resumed run); a fresh run refuses an existing log unless told to
overwrite it. A last line torn by a crash is dropped with a note; a bad line before it is an
error naming it. A write that fails (a full disk) is a ResourceError naming the log, after
which the log takes no more lines."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError, ResourceError, UsageError
from ..fileio import atomic_write, memory_limit, read_bounded


def check_log(path, resume: bool, overwrite: bool) -> None:
    """Before anything is written: an existing log is continued (--resume) or replaced
    (--overwrite-log), never silently truncated."""
    path = Path(path)
    if path.is_file() and path.stat().st_size and not (resume or overwrite):
        raise UsageError(f"--log {path}: exists; pass --resume to continue its run, or "
                         f"--overwrite-log to replace it")


class MetricsLog:
    def __init__(self, path=None, resume_step: int | None = None, note=print):
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        self.file = None
        if self.path is None:
            return
        if resume_step is not None and self.path.is_file():
            self.records = [r for r in _read(self.path, note) if r["step"] <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.path, lambda f: f.write(text.encode()))
        try:
            self.file = open(self.path, "a" if resume_step is not None else "w")
        except OSError as exc:
            raise ResourceError(f"--log {self.path}: cannot write ({exc.strerror})") from None

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as exc:
                self._abandon()
                raise ResourceError(f"--log {self.path}: cannot write "
                                    f"({exc.strerror or exc})") from None

    def close(self) -> None:
        if self.file:
            self.file.close()

    def _abandon(self) -> None:
        """Close the file, dropping what it could not write (closing flushes it again)."""
        file, self.file = self.file, None
        try:
            file.close()
        except OSError:
            pass


def _read(path: Path, note) -> list[dict]:
    data = read_bounded(path, "metrics log", memory_limit(), "half the memory available")
    lines = data.decode("utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for k, (number, line) in enumerate(numbered):
        record = _record(line)
        if record is None and k == len(numbered) - 1:
            note(f"{path}:{number}: dropped a torn last line (the run before stopped mid-write)")
        elif record is None:
            raise InputError(f"{path}:{number}: not a metrics record; fix or remove the line")
        else:
            records.append(record)
    return records


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, ValueError, RecursionError):  # ValueError: a huge integer
        return None
    ok = isinstance(record, dict) and type(record.get("step")) is int
    return record if ok else None
