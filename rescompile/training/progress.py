"""Training progress on stderr: one line redrawn in place with \\r on a terminal, and a plain
line every few percent otherwise, so that logs and CI keep a readable history."""

from __future__ import annotations

import sys
import time

BAR = 20
LINES = 20        # lines printed over a run when not on a terminal
REDRAW_S = 0.1    # a terminal line is redrawn at most this often
SMOOTHING = 0.9   # weight of the past in the step-time average behind images/s and ETA


class Progress:
    def __init__(self, total: int, start: int, batch_size: int, out=None, ranks: int = 1):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.total, self.batch_size, self.ranks = total, batch_size, ranks  # global batch
        self.comm_s = 0.0
        self.every = max(1, (total - start) // LINES)
        self.step_s = None
        self.drawn_at = 0.0
        self.line_open = False

    def update(self, step: int, loss: float, lr: float, step_s: float,
               comm_s: float = 0.0) -> None:
        self.step_s = step_s if self.step_s is None else (
            SMOOTHING * self.step_s + (1 - SMOOTHING) * step_s)
        self.comm_s = SMOOTHING * self.comm_s + (1 - SMOOTHING) * comm_s
        now = time.monotonic()
        last = step == self.total
        if self.tty and (last or now - self.drawn_at >= REDRAW_S):
            self.out.write("\r" + self._line(step, loss, lr) + "\x1b[K")
            self.out.flush()
            self.drawn_at, self.line_open = now, True
        elif not self.tty and (last or step % self.every == 0):
            print(self._line(step, loss, lr), file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A line of its own (an evaluation, a checkpoint), kept above the redrawn line."""
        self.close()
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.line_open:
            self.out.write("\n")
            self.line_open = False

    def _line(self, step: int, loss: float, lr: float) -> str:
        done = step / self.total
        bar = "#" * round(done * BAR)
        eta = _duration(self.step_s * (self.total - step))
        ranks = (f"  {self.ranks} ranks, all-reduce {self.comm_s * 1e3:.1f} ms"
                 if self.ranks > 1 else "")
        return (f"step {step}/{self.total} [{bar:<{BAR}}] {done:4.0%}  loss {loss:.4f}  "
                f"lr {lr:g}  {self.batch_size / self.step_s:,.0f} img/s{ranks}  ETA {eta}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
