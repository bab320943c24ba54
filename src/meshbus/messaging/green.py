"""The library's own threads (a transport's I/O thread, a server's worker pool), and eventlet support: the
blocking API in a process that eventlet has monkey-patched (oslo services).

Rules of this module:
1. It never imports eventlet on its own: `active()` is true only when the application has imported eventlet
   and monkey-patched threading; the eventlet parts of this module are used only then.
2. A transport's I/O loop runs on a real OS thread: on a green thread its loop would block the whole hub.
3. Eventlet's locks cannot be released from another OS thread (the waiter's hub is never told), so the I/O
   thread and green threads share no green lock. A green thread waiting for the loop polls an eventfd that
   the I/O thread writes to, through its hub, as eventlet's tpool does with a socket pair; the futures they
   share hold real locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import select
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("meshbus.messaging")


def active() -> bool:
    """Whether eventlet has monkey-patched threading here (without importing eventlet to find out)."""
    if "eventlet" not in sys.modules:
        return False
    from eventlet import patcher

    return bool(patcher.is_monkey_patched("thread"))


def _real_threading() -> ModuleType:
    if not active():
        return threading
    from eventlet import patcher

    module: ModuleType = patcher.original("threading")
    return module


def os_thread_local() -> threading.local:
    """Data of each OS thread, even where eventlet patched threading (its `threading.local` is per green
    thread): for what green threads of one OS thread may share, as nothing between two switches can."""
    local: threading.local = _real_threading().local()
    return local


def shared_lock() -> threading.Lock:
    """A lock that OS threads and green threads share (rule 3): a real one, even where eventlet patched
    threading. Hold it briefly, never across anything that may switch green threads."""
    lock: threading.Lock = _real_threading().Lock()
    return lock


def at_fork_in_child(method: Callable[[], object]) -> None:
    """Call the bound `method` in the child of every fork from now on, while its object lives (it is held
    weakly). Threads do not come along into a child: what relies on one must know it is in a child."""
    held = weakref.WeakMethod(method)

    def in_child() -> None:
        alive = held()
        if alive is not None:
            alive()

    os.register_at_fork(after_in_child=in_child)


def yield_on_wakeup() -> None:
    """Make the calling thread one that, when woken, waits for its turn on the core instead of preempting the
    thread that woke it (Linux SCHED_BATCH; elsewhere nothing).

    For the library's own threads only. Where a process's threads share a core, a woken thread otherwise
    preempts its waker while the waker still holds the GIL, blocks on the GIL at once and hands the core
    back: two context switches for nothing, once per message handed between the I/O thread and a worker.
    A thread blocked on the GIL gains nothing from preempting anyway; and on an idle core it runs at once."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux; a policy this system forbids
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class Wakeup:
    """An eventfd through which threads wake the one thread that waits on it: `wake()` and `wait()` release
    the GIL, unlike a lock's release. A thread woken by a lock's release preempts its waker (on the same
    core) while the waker still holds the GIL, so it blocks again at once: two context switches for nothing.
    `for_loop=True`: an event loop watches `fd` and calls `clear()` instead of waiting. Made where eventlet
    has patched threading, its waiter is a green thread, which waits through its hub (rule 3)."""

    __slots__ = ("_green", "fd")

    def __init__(self, *, for_loop: bool = False) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if for_loop else 0))
        self._green = not for_loop and active()

    def wake(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Until woken (True) or `timeout` seconds have passed (False); a wake not yet waited for counts."""
        if self._green:
            from eventlet.hubs import trampoline

            try:  # eventfd_read alone would block the OS thread, and every green thread with it
                trampoline(self.fd, read=True, timeout=timeout, timeout_exc=TimeoutError)
            except TimeoutError:
                return False
        elif timeout is not None and not select.select([self.fd], [], [], max(timeout, 0.0))[0]:
            return False
        os.eventfd_read(self.fd)
        return True

    def clear(self) -> None:
        """Forget the wakes so far (`for_loop` only)."""
        with contextlib.suppress(BlockingIOError):  # none since the last look
            os.eventfd_read(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a thread's own, dropped when the thread ends
        self.close()


def os_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread of the library's own (see `yield_on_wakeup`), an OS thread even when threading is
    monkey-patched."""

    def run() -> None:
        yield_on_wakeup()
        target()

    thread: threading.Thread = _real_threading().Thread(target=run, name=name, daemon=True)
    return thread


class _Call(Generic[T]):
    """A coroutine run on the I/O loop for a green thread: the loop writes `wakeup` once it is done."""

    def __init__(self, coroutine: Coroutine[Any, Any, T]) -> None:
        self.coroutine = coroutine
        self.wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.task: asyncio.Task[T] | None = None
        self.abandoned = False

    # The three methods below run on the loop, which is why they need no lock between them.
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.coroutine)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[T]) -> None:
        if not self.abandoned:
            os.eventfd_write(self.wakeup, 1)

    def abandon(self) -> None:
        """The green thread gave up waiting (eventlet.Timeout, killed): the eventfd is the loop's to close."""
        self.abandoned = True
        os.close(self.wakeup)
        assert self.task is not None
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved: nobody is left to see it
        self.task.cancel()


def run(call_soon: Callable[..., object], coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on the loop of another OS thread, which `call_soon(callback)` hands callbacks to
    (its transport's way, so that what is queued as it closes still runs), and return its result; meanwhile
    the calling green thread's hub runs the other green threads."""
    from eventlet.hubs import trampoline

    call = _Call(coroutine)
    try:
        call_soon(call.start)
    except BaseException:  # closed: the coroutine never starts
        os.close(call.wakeup)
        coroutine.close()
        raise
    try:
        trampoline(call.wakeup, read=True)
    except BaseException:
        # Closed meanwhile: then the loop runs nothing more, and the eventfd stays open rather than risk
        # a late write into a descriptor reused since.
        with contextlib.suppress(Exception):
            call_soon(call.abandon)
        raise
    os.close(call.wakeup)
    assert call.task is not None
    return call.task.result()


class _SharedFuture(concurrent.futures.Future[T]):
    """A future the I/O thread and green threads share: its condition is a real lock (rule 3)."""

    def __init__(self) -> None:
        super().__init__()
        self._condition = _real_threading().Condition()


_WorkItem = tuple[_SharedFuture[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class GreenExecutor(concurrent.futures.Executor):
    """Runs what the I/O thread submits in green threads of the hub that made the executor, at most
    `max_workers` at once: endpoints run as they do under oslo.messaging's eventlet executor, free to use
    green locks and green I/O that the rest of the service shares."""

    def __init__(self, max_workers: int) -> None:
        import eventlet

        self._pool = eventlet.GreenPool(max_workers)
        self._queue: deque[_WorkItem] = deque()  # appended by the I/O thread, emptied by the dispatcher
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False
        self._dispatcher = eventlet.spawn(self._dispatch)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError("cannot run more work: the server's executor is shut down")
        future: _SharedFuture[T] = _SharedFuture()
        self._queue.append((future, fn, args, kwargs))
        os.eventfd_write(self._wakeup, 1)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._dispatcher.kill()
        while self._queue:  # submitted but not yet dispatched
            item = self._queue.popleft()
            if cancel_futures:
                item[0].cancel()
            else:
                self._pool.spawn_n(_work, *item)
        if wait:
            self._pool.waitall()
        os.close(self._wakeup)

    def _dispatch(self) -> None:
        from eventlet.hubs import trampoline

        while True:
            trampoline(self._wakeup, read=True)
            os.eventfd_read(self._wakeup)
            while self._queue:
                self._pool.spawn_n(_work, *self._queue.popleft())  # waits while the pool is full


def _work(
    future: concurrent.futures.Future[T], fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:  # as concurrent.futures' workers: the future carries it
        future.set_exception(error)
    else:
        future.set_result(result)


class Workers(concurrent.futures.Executor):
    """Up to `max_workers` threads of the library's own (see `yield_on_wakeup`), started as work comes, that
    run what they are given. `run(fn, *args)` gives a job without a future: a ThreadPoolExecutor's future,
    condition and semaphore per job cost a server more than its dispatch (bench/README.md). `submit` is
    there for what needs an executor (asyncio's run_in_executor)."""

    def __init__(self, max_workers: int, thread_name: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self.max_workers = max_workers
        self.thread_name = thread_name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._starting = shared_lock()
        self._closed = False

    def run(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Call `fn(*args)` in a worker; what it raises is logged."""
        if self._closed:
            raise RuntimeError("cannot run more work: the server's workers are shut down")
        self._jobs.put((fn, args))
        # A worker that is free takes the job; until every worker exists, one more is started in case none is.
        if len(self._threads) < self.max_workers:
            with self._starting:  # `submit` may come from any thread
                if len(self._threads) < self.max_workers:
                    thread = os_thread(self._work, f"{self.thread_name}_{len(self._threads)}")
                    self._threads.append(thread)
                    thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.run(_work, future, fn, args, kwargs)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Run what was given, then end the threads (`cancel_futures` is ignored: nothing is dropped)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("a job given to the library's workers failed")


def executor(max_workers: int, thread_name: str) -> concurrent.futures.Executor:
    """Where a blocking server runs its endpoints' plain methods: green threads under eventlet, else
    `Workers`, `max_workers` threads of the library's own named after `thread_name`."""
    if active():
        return GreenExecutor(max_workers)
    return Workers(max_workers, thread_name)
