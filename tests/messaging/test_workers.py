"""The blocking servers' worker pool (green.WorkerPool), driven from the test's thread: no router, no loop."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from typing import Any

import pytest

from meshbus.messaging.green import WorkerPool

WAIT = 10.0


class HandedBack:
    """Stands for the loop's call_soon_threadsafe: records what the workers hand back."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def __call__(self, callback: Any, *args: Any) -> None:
        self.calls.put((callback, *args))

    def next(self) -> tuple[Any, ...]:
        return self.calls.get(timeout=WAIT)


def test_run_hands_each_result_back_to_its_then() -> None:
    handed = HandedBack()
    pool = WorkerPool(2, "test-pool", handed)
    thens = [lambda result: None for _ in range(10)]
    for n, then in enumerate(thens):
        pool.run(functools.partial(pow, n, 2), then)
    got = {handed.next() for _ in thens}
    pool.shutdown()
    assert got == {(then, n * n) for n, then in enumerate(thens)}


def test_no_more_than_max_workers_run_at_once() -> None:
    handed = HandedBack()
    pool = WorkerPool(3, "test-pool", handed)
    lock = threading.Lock()
    running = peak = 0
    release = threading.Event()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(WAIT)
        with lock:
            running -= 1

    for _ in range(8):
        pool.run(work, print)
    deadline = time.monotonic() + WAIT
    while peak < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for _ in range(8):
        handed.next()
    pool.shutdown()
    assert peak == 3
    assert sum(t.name.startswith("test-pool_") for t in threading.enumerate()) == 0, "workers ended"


def test_shutdown_runs_what_is_queued_then_refuses_more() -> None:
    handed = HandedBack()
    pool = WorkerPool(1, "test-pool", handed)
    gate = threading.Event()
    pool.run(lambda: gate.wait(WAIT), print)
    for n in range(5):
        pool.run(functools.partial(int, n), print)
    threading.Timer(0.1, gate.set).start()
    pool.shutdown(wait=True)
    assert [handed.next()[1] for _ in range(6)] == [True, 0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.run(lambda: 1, print)


def test_submit_gives_a_future_with_the_result_or_the_error() -> None:
    pool = WorkerPool(2, "test-pool", HandedBack())
    assert pool.submit(pow, 2, 10).result(WAIT) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(WAIT)
    pool.shutdown()


def test_a_job_that_raises_is_logged_and_its_worker_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    handed = HandedBack()
    pool = WorkerPool(1, "test-pool", handed)

    def fails() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="meshbus.messaging"):
        pool.run(fails, print)
        pool.run(lambda: "after", print)
        assert handed.next()[1] == "after"
    pool.shutdown()
    assert "test-pool" in caplog.text and "boom" in caplog.text
