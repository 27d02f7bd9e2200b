"""The thread count a call runs on (backends/cpu/threads.py): the policy on scripted
durations, and the same bits on one thread as on all."""

import numba
import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu import threads
from rescompile.backends.cpu.threads import PROBE, SHARE, SLOWER, WINDOW, ThreadCount

from conftest import tiny_spec


# Trials of all threads 2, 4, 8, ... calls after a switch to one, before PROBE.
EARLY_PROBES = len([k for k in range(1, PROBE.bit_length()) if 2 ** k < PROBE])


def play(count: ThreadCount, seconds_on, calls: int, share_on=lambda n, call: 1.0) -> list:
    """The thread counts of `calls` calls, each lasting seconds_on(threads, call), its
    threads on their cores share_on(threads, call) of that time."""
    chosen = []
    for call in range(calls):
        n = count.choose()
        count.record(n, seconds_on(n, call), share_on(n, call))
        chosen.append(n)
    return chosen


def test_a_quiet_machine_stays_on_all_threads():
    assert play(ThreadCount(2), lambda n, call: 1.0 if n == 2 else 1.9, 1000) == [2] * 1000


def test_calls_of_unknown_share_on_a_quiet_machine_stay_on_all_threads():
    chosen = play(ThreadCount(2), lambda n, call: 1.0 if n == 2 else 1.9, 100,
                  lambda n, call: None)
    assert chosen == [2] * 100


def test_a_busy_core_moves_the_calls_to_one_thread_and_a_free_one_back():
    def seconds_on(n, call):
        busy = 20 <= call < 200
        return {2: 5.0 if busy else 1.0, 1: 1.9}[n]
    chosen = play(ThreadCount(2), seconds_on, 300)
    assert chosen[:WINDOW - 1] == [2] * (WINDOW - 1)
    # The median of WINDOW calls turns slow within WINDOW // 2 + 1 busy calls, then one
    # thread is tried and kept, with a trial of all threads every PROBE calls.
    switched = 20 + WINDOW // 2 + 1
    assert chosen[switched] == 1
    busy_tail = chosen[switched + 1:200]
    assert busy_tail.count(2) <= len(busy_tail) // PROBE + 1 + EARLY_PROBES
    # Freed, the next trial of all threads is faster and they are kept.
    assert chosen[200 + PROBE + 1:] == [2] * (300 - 200 - PROBE - 1)


def test_a_machine_busy_from_the_start_finds_one_thread_from_the_share():
    """Every call slow from the first leaves no faster best to compare with; the threads'
    share of their cores (half of one taken) says a core is busy."""
    chosen = play(ThreadCount(2), lambda n, call: 5.0 if n == 2 else 1.9, 100,
                  lambda n, call: 0.5 if n == 2 else 1.0)
    assert chosen[:WINDOW + 1] == [2] * WINDOW + [1]
    later = chosen[WINDOW + 1:]
    assert later.count(2) <= len(later) // PROBE + 1 + EARLY_PROBES


def test_a_share_at_the_threshold_tries_nothing():
    chosen = play(ThreadCount(2), lambda n, call: 1.0 if n == 2 else 1.9, 100,
                  lambda n, call: SHARE)
    assert chosen == [2] * 100


def test_a_burst_of_noise_costs_a_few_calls_on_one_thread_not_a_probe_period():
    """Three slow calls on all threads (a shared machine's noise, not a busy core) move the
    calls to one thread; the trial of all threads 2 calls later finds them fast again."""
    def seconds_on(n, call):
        return {2: 5.0 if 20 <= call < 23 else 1.0, 1: 1.9}[n]
    chosen = play(ThreadCount(2), seconds_on, 60)
    on_one = [call for call, n in enumerate(chosen) if n == 1]
    assert on_one and min(on_one) >= 20 and max(on_one) <= 23 + 2  # no early trial: 23 + PROBE


def test_noise_below_the_threshold_tries_nothing_more():
    rng = np.random.default_rng(0)
    chosen = play(ThreadCount(2), lambda n, call:
                  (1.0 + (SLOWER - 1) * 0.9 * rng.random()) if n == 2 else 3.0, 200,
                  lambda n, call: SHARE + (1 - SHARE) * rng.random())
    assert chosen == [2] * 200


def test_one_thread_is_one_thread():
    assert play(ThreadCount(1), lambda n, call: 1.0, 50) == [1] * 50


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
def test_a_call_on_one_thread_gives_the_bits_of_all(monkeypatch):
    """Inference at an odd batch runs images depth first and one shared: both parts, on an
    arena laid out for 2 threads, run on 1."""
    spec = tiny_spec(unit="bottleneck", input=[12, 12, 3])
    x = np.random.default_rng(5).standard_normal((3, 12, 12, 3))
    infer = rc.compile(spec, mode="infer", backend="cpu", seed=4)
    train = rc.compile(spec, mode="train", backend="cpu", seed=4)
    labels = np.array([0, 2, 1])
    on_all = infer.forward(x), train.loss_and_grads(x, labels)
    monkeypatch.setattr(threads.ThreadCount, "choose", lambda self: 1)
    on_one = infer.forward(x), train.loss_and_grads(x, labels)
    np.testing.assert_array_equal(on_all[0], on_one[0])
    assert on_all[1][0] == on_one[1][0]
    for name, grad in on_all[1][1].items():
        np.testing.assert_array_equal(grad, on_one[1][1][name], err_msg=name)
