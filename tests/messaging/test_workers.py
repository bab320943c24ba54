"""green.Workers, the thread pool of the blocking servers, on its own, and how a service hands work to it and
takes the results back: no router."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from meshbus.messaging.green import Workers
from meshbus.messaging.transport import AsyncService

WAIT = 10.0


def test_jobs_run_on_at_most_max_workers_threads_of_the_librarys_own() -> None:
    workers = Workers(3, "test-worker")
    lock = threading.Lock()
    running = peak = 0
    names: set[str] = set()
    done = threading.Semaphore(0)

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        time.sleep(0.01)
        with lock:
            running -= 1
        done.release()

    for _ in range(20):
        workers.run(job)
    for _ in range(20):
        assert done.acquire(timeout=WAIT)
    workers.shutdown()
    assert peak == 3
    assert names == {"test-worker_0", "test-worker_1", "test-worker_2"}


def test_a_job_that_blocks_holds_up_no_other() -> None:
    """A job that blocks (an endpoint waiting on I/O) leaves the others to the other workers."""
    workers = Workers(2, "test-worker")
    gate = threading.Event()
    done = threading.Event()
    workers.run(gate.wait, WAIT)
    workers.run(done.set)
    assert done.wait(WAIT)
    gate.set()
    workers.shutdown()


def test_a_failing_job_is_logged_and_the_worker_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    workers = Workers(1, "test-worker")
    ran = threading.Event()

    def fail() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="meshbus.messaging"):
        workers.run(fail)
        workers.run(ran.set)
        assert ran.wait(WAIT)
    workers.shutdown()
    assert "a job given to the library's workers failed" in caplog.text
    assert "boom" in caplog.text


def test_submit_gives_a_future_and_shutdown_runs_what_was_given_first() -> None:
    workers = Workers(2, "test-worker")
    gate = threading.Event()
    finished: list[int] = []
    workers.run(gate.wait, WAIT)
    for n in range(5):
        workers.run(finished.append, n)
    future = workers.submit(pow, 2, 10)
    gate.set()
    assert future.result(WAIT) == 1024
    workers.shutdown(wait=True)
    assert sorted(finished) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="shut down"):
        workers.run(print)


def test_a_service_gets_every_result_back_on_its_loop_though_a_job_and_a_follow_up_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Results come back in bursts (one call of the loop for many): one that fails must not strand the rest,
    and each piece of work ends, so that `wait()` returns."""
    got: list[int] = []
    loop_threads: set[int] = set()

    def keep(result: int) -> None:
        loop_threads.add(threading.get_ident())
        got.append(result)

    def fail() -> int:
        raise RuntimeError("job")

    def fail_after(result: int) -> None:
        raise RuntimeError("follow-up")

    async def main() -> None:
        workers = Workers(4, "test-worker")
        transport: Any = SimpleNamespace(loop=asyncio.get_running_loop())
        service = AsyncService(transport, workers)
        service.run_in_worker(fail, keep)
        service.run_in_worker(lambda: -1, fail_after)
        for turn in range(10):
            for job in range(50):
                service.run_in_worker(functools.partial(int, turn * 50 + job), keep)
            await asyncio.sleep(0)
        await asyncio.wait_for(service.wait(), WAIT)
        workers.shutdown()
        assert loop_threads == {threading.get_ident()}

    with caplog.at_level(logging.ERROR, logger="meshbus.messaging"):
        asyncio.run(main())
    assert sorted(got) == list(range(500))
    assert "a worker's job failed" in caplog.text
    assert "handling a worker's result failed" in caplog.text
