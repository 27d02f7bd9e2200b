"""The metrics log: one JSON object per line (step, loss, lr, images_per_s, and accuracy after
an evaluation), flushed as training goes so that it can be followed with `tail -f`.

A resumed run keeps the records up to the checkpoint's step and appends after them: records
of steps done after that checkpoint, before a crash, are replayed by the resumed run."""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_write


class MetricsLog:
    def __init__(self, path=None, resume_step: int | None = None):
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        self.file = None
        if self.path is None:
            return
        if resume_step is not None and self.path.is_file():
            self.records = [r for r in _read(self.path) if r["step"] <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.path, lambda f: f.write(text.encode()))
        self.file = open(self.path, "a" if resume_step is not None else "w")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
