"""Executables used from several Python threads (a thread-pool server, say): concurrent calls
give the bits serial calls give, lose no update, and never hang the process; the CPU
driver's thread pool is made once, and a forked child makes its own.

The driver's pool has one job table, so a second concurrent entry would mix two runs' tables
(and could leave a thread waiting forever): the forward test runs in a subprocess, so that
without the driver's lock it fails or times out as a test instead of taking pytest down.
(The train-step test runs in this process: without the executable's lock it fails on lost
updates.)"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu import driver, pool
from conftest import ROOT, random_bn_state, tiny_spec

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


def pool_threads() -> int:
    return sum(t.name.startswith("rescompile-") for t in threading.enumerate())


@pytest.mark.skipif(driver.threads() < 2, reason="one thread: runs use no pool")
def test_the_pool_is_made_once_and_a_forked_child_makes_its_own():
    """Runs on every thread reuse one pool of threads - 1; a child forked after them has
    none of its parent's threads, makes its own pool and computes the same logits."""
    exe = rc.compile(tiny_spec(), backend="cpu", seed=5)
    exe.load_params(random_bn_state(exe, seed=5))
    images = np.random.default_rng(2).standard_normal((1, 8, 8, 3)).astype(np.float32)
    expected = exe.forward(images)
    made = pool_threads()
    assert made == driver.threads() - 1
    for _ in range(20):
        assert np.array_equal(exe.forward(images), expected)
    assert pool_threads() == made
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only on the parent's bits, run on a pool of its own
        twice = exe.forward(np.concatenate([images, images]))  # a new batch: every thread
        same = np.array_equal(twice, np.concatenate([expected, expected]))
        os._exit(0 if same and pool_threads() == made else 1)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, done


@pytest.mark.skipif(driver.threads() < 2, reason="one thread: runs use no pool")
def test_runs_on_the_pool_record_their_threads_share_of_the_cores():
    """The CPU time of the caller and the pool's threads reaches the thread count: each run
    on every thread but the first (the pool is made in it) records a share of its threads'
    time: near 1 on a quiet machine, more on calls as short as these (the clocks are read
    around the run), never 0 (the policy on scripted shares: test_thread_count.py)."""
    exe = rc.compile(tiny_spec(), backend="cpu", seed=5)
    images = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
    for _ in range(4):
        exe.forward(images)
    assert pool.cpu_seconds(driver.threads()) is not None
    counts = [c for a in exe.program.arenas.values() for c in a.thread_counts.values()]
    shares = [share for count in counts for share in count.shares]
    assert len(shares) >= 3 and all(0 < share < 3 for share in shares), shares
