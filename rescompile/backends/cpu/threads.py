"""How many of the process's threads a call of the driver runs on.

Design note
-----------
The driver splits a call over the threads Numba gives it, and at batch 1 (and in training)
every layer ends at a barrier. Where another process or thread pool keeps a core busy, each
barrier waits for a thread that is not running: ResNet-164 at batch 1 took 16 ms on 2 threads
beside a busy core, and 4 ms on one thread, where it takes 3 ms on 2 threads alone.

So each kind of call (an arena's whole schedule, or one range of its steps) keeps the last few
durations on each thread count (`WINDOW`), and the share of its threads' time that they spent
on a core (`pool.cpu_seconds`: a thread waiting at a barrier spins, then sleeps; a thread
whose core is taken runs part of the time). While its calls on all threads run well above
their best (`SLOWER`: a core taken after the calls ran well) or their threads get well under
their cores (`SHARE`: a core taken from the first call, which leaves no good best to compare
with) it tries one thread: at once while one thread has no record or a better one, else
every `PROBE` calls; on one thread it tries all threads every `PROBE` calls, and also 2, 4
and 8 calls after the switch: on a shared VM a burst of noise (a few calls, the other vCPU
descheduled) looks like a busy core, and without the early trials each burst kept ResNet-18
at batch 1 on one thread (19 ms a call against 11) for PROBE calls (in a simulation of such
bursts the early trials took the mean call from 1.51 to 1.39 times the quiet one, and cost
nothing measurable where a core stays busy). A trial faster than the median of the count in
use switches to it, and a switch starts the new count's record afresh (its older durations
were measured under another load). Calls on a quiet machine stay near their best, on their
cores, and never try one thread: a blind trial would cost a train step twice its time
(ResNet-164 at batch 128: 3.6 s on one thread against 2.0 s on two, Zen 4). Which thread
computes what never changes a number (driver.py), so neither does the count.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 5  # recent durations kept per thread count
SLOWER = 1.5  # a median this far above the best on all threads suggests a busy core
PROBE = 16  # while in doubt, try the other thread count once every this many calls
# A median share of the threads' time on a core below this suggests a busy core: calls alone
# on a quiet machine measured 0.99-1.0 (ResNet-164 at batch 1, 10th to 90th percentile; a
# few below, where the pool thread was woken for a call) and 0.96-0.98 (its train step);
# beside a process busy on one of the 2 cores, 0.50 (Zen 4).
SHARE = 0.8


class ThreadCount:
    """The thread count for the next call of one kind (`choose`), from the durations of the
    calls before it (`record`)."""

    def __init__(self, most: int):
        self.most = most
        self.recent = {most: deque(maxlen=WINDOW), 1: deque(maxlen=WINDOW)}
        self.shares = deque(maxlen=WINDOW)  # of the recent calls on all threads
        self.best = float("inf")  # the fastest call on all threads
        self.current = most
        self.calls = 0
        self.switched_at = 0  # the call that last changed the count

    def choose(self) -> int:
        self.calls += 1
        if self.most == 1:
            return 1
        other = 1 if self.current == self.most else self.most
        in_doubt = self.current == 1 or self._crowded()
        if in_doubt and (self._promising(other) or self._probe_due()):
            return other
        return self.current

    def record(self, threads: int, seconds: float, share: float | None = None) -> None:
        """A call's duration on `threads`, and the share of their time its threads spent on a
        core (None: unknown)."""
        if threads == self.most:
            self.best = min(self.best, seconds)
        if threads != self.current and self.recent[self.current] and \
                seconds < statistics.median(self.recent[self.current]):
            self.current = threads
            self.switched_at = self.calls
            self.recent[threads].clear()
            self.shares.clear()
        self.recent[threads].append(seconds)
        if threads == self.most and share is not None:
            self.shares.append(share)

    def _promising(self, threads: int) -> bool:
        """Never tried, or faster than the count in use when last tried."""
        recent = self.recent[threads]
        return not recent or statistics.median(recent) < statistics.median(
            self.recent[self.current])

    def _probe_due(self) -> bool:
        """Every PROBE calls, and on one thread also 2, 4, 8, ... calls after the switch to
        it: a burst of noise on a shared machine looks like a busy core for a few calls, and
        the calls after it should not wait PROBE calls on one thread."""
        since = self.calls - self.switched_at
        early = self.current == 1 and 2 <= since < PROBE and since & (since - 1) == 0
        return early or self.calls % PROBE == 0

    def _crowded(self) -> bool:
        recent, shares = self.recent[self.most], self.shares
        slow = len(recent) == WINDOW and statistics.median(recent) > SLOWER * self.best
        return slow or (len(shares) == WINDOW and statistics.median(shares) < SHARE)
