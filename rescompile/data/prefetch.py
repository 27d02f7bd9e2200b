"""Run an iterator ahead of its consumer on a background thread.

NumPy releases the GIL in its heavy loops, so preparing the next batches overlaps with
the device running the current one. The worker posts ("item", x), ("done", None) or
("error", exc) messages; puts time out and retry so that close() can always stop it.
"""
import queue
import threading

_POLL_S = 0.05


class Prefetcher:
    def __init__(self, source, depth=2):
        if not 1 <= depth <= 4:
            raise ValueError(f"prefetch depth {depth} must be between 1 and 4")
        self._source = source
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._work, name="Prefetcher", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._finished = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self):
        """Stop the worker and wait for it; further next() calls raise StopIteration."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _work(self):
        try:
            for item in self._source:
                if not self._put(("item", item)):
                    return
            self._put(("done", None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            self._put(("error", exc))

    def _put(self, message):
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
