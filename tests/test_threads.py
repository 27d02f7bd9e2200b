"""Executables used from several Python threads (a thread-pool server, say): concurrent calls
give the bits serial calls give, lose no update, and never abort the process.

Numba's workqueue layer aborts the process (SIGABRT) on a second concurrent entry into a
parallel region, so the forward test runs in a subprocess: without the driver's lock it fails
as a test instead of taking pytest down. (The train-step test runs in this process: without
the executable's lock it fails on lost updates, and without both locks it aborts.)"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import rescompile as rc
from conftest import ROOT, tiny_spec

THREADS, CALLS = 4, 30


def in_threads(work, threads: int = THREADS) -> list:
    """work(t) on `threads` threads started together; their results in thread order."""
    results, errors = [None] * threads, []
    start = threading.Barrier(threads)

    def one(t):
        try:
            start.wait()
            results[t] = work(t)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assert
            errors.append(exc)
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    return results


def forward_calls(exes, batches) -> list:
    """Thread t calls forward CALLS times on exes[t % len(exes)], batch (t + k) % len."""
    def work(t):
        exe = exes[t % len(exes)]
        return [exe.forward(batches[(t + k) % len(batches)]) for k in range(CALLS)]
    return in_threads(work)


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import rescompile as rc
    sys.path.insert(0, "tests")
    from conftest import random_bn_state, tiny_spec
    from test_threads import CALLS, THREADS, forward_calls

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 8, 8, 3)).astype(np.float32) for _ in range(5)]
    exes = []
    for k in range(THREADS):
        exe = rc.compile(tiny_spec(), backend="cpu", seed=k)
        exe.load_params(random_bn_state(exe, seed=k))
        exes.append(exe)
    for shared in (exes[:1], exes):
        serial = [[exe.forward(b) for b in batches] for exe in shared]
        got = forward_calls(shared, batches)
        for t, calls in enumerate(got):
            for k, logits in enumerate(calls):
                expected = serial[t % len(shared)][(t + k) % len(batches)]
                assert np.array_equal(logits, expected), (len(shared), t, k)
    print("ok", len(exes))
""")


def test_concurrent_forward_matches_serial_on_one_executable_and_on_four():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok 4", \
        f"exit {done.returncode}: {done.stderr[-2000:]}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_concurrent_train_steps_lose_no_update(backend):
    """Two threads, each taking 3 steps on the same batch, end where 6 serial steps end."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 4)
    serial, shared = (rc.compile(tiny_spec(), mode="train", backend=backend, seed=3)
                      for _ in range(2))
    for _ in range(6):
        serial.train_step(images, labels)
    in_threads(lambda t: [shared.train_step(images, labels) for _ in range(3)], threads=2)
    assert shared.step == serial.step == 6
    for name, value in serial.state.items():
        assert np.array_equal(shared.state[name], value), name

