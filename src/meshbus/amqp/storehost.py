"""The router's embedded store on the event loop: opening it, group commits, the expiry timer, closing it.

Rules of this module:
1. It owns the store's asyncio side: a turn of the endpoint whenever it asks (`wake`; run before the router
   next writes output, or at the end of the loop's turn), one group commit at a time (sealed on the loop
   when the store says it is due, written on the writer thread, completion back on the loop by one
   callback), a timer for a commit the store wants later, a timer at the store's next message deadline.
   What the store and the endpoint decide lives in meshbus.store.
2. It logs what an operator needs: the store opened (queues, messages recovered, time taken), a write
   that failed, the store closed with its counters.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from meshbus.config import RouterConfig
from meshbus.router.core import RouterCore
from meshbus.store.endpoint import StoreEndpoint
from meshbus.store.engine import Batch, EngineFailed
from meshbus.store.queue import QueueLimits
from meshbus.store.store import Store

log = logging.getLogger("meshbus.store")

STREAM_POLL = 0.05  # seconds between turns while a multi-frame delivery to a queue is arriving


class StoreHost:
    """Drives one store's endpoint on the running event loop."""

    def __init__(self, store: Store, core: RouterCore, config: RouterConfig) -> None:
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.endpoint = StoreEndpoint(store, core, config.queue_limits(), time.time, self.wake)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshbus-store")
        self._scheduled = False
        self._writing: Batch | None = None  # one batch at a time, in the order sealed
        self._commit_timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None  # epoch seconds the timer is armed for
        self._lock: IO[bytes] | None = None  # held while the store is open: one router per store file

    @classmethod
    def open(cls, config: RouterConfig, core: RouterCore) -> StoreHost:
        """Open (or create) the configured store file, recover its queues and start serving them."""
        path = config.store_path()
        started = time.perf_counter()
        rules = config.queue_rules()
        limits = config.queue_limits()
        default = QueueLimits()

        def limits_of(address: str) -> QueueLimits:
            rule = rules.lookup(address)
            return default if rule is None else limits.get(rule, default)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _lock(path)
            store = Store.open(
                path, limits_of, synchronous=config.store.sync.upper(), commit_delay=config.store.commit_delay
            )
        except (OSError, sqlite3.Error) as error:
            raise SystemExit(
                f"meshbus: error: cannot open the store {path}: {error}; check the [store] path and its "
                "directory's permissions, or set enabled = false in [store]"
            ) from error
        host = cls(store, core, config)
        host._lock = lock
        host.endpoint.start()
        messages = sum(queue.depth for queue in store.queues.values())
        log.info(
            "store %s opened (sync %s): %d queues, %d messages recovered in %.2f s",
            path,
            config.store.sync,
            len(store.queues),
            messages,
            time.perf_counter() - started,
        )
        host._arm_expiry()
        return host

    def wake(self) -> None:
        """The endpoint has work: a turn before the router next writes output (`run_pending_turn`), or at
        the latest at the end of this turn of the event loop."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.run_pending_turn)

    def run_pending_turn(self) -> None:
        """The turn `wake` asked for, if it has not run yet: at the end of the loop's turn, or sooner when the
        router is about to write output (Engine.before_flush), so that what the turn sends (deliveries,
        producers accepted) leaves with the input that caused it."""
        if not self._scheduled:
            return
        self._scheduled = False
        try:
            self.endpoint.turn()
        except Exception:
            log.exception("internal error in the store's turn")
        self._commit_when_due()
        if self.endpoint.streaming:
            self.loop.call_later(STREAM_POLL, self.wake)
        self._arm_expiry()

    def _commit_when_due(self) -> None:
        """Unless a batch is being written (its completion asks again): seal and write the open batch if the
        store says it is due, else have the timer ask again when it will be."""
        if self._writing is not None:
            return
        due = self.store.commit_due(self.loop.time())
        if due is None:
            return
        if due > 0:
            if self._commit_timer is None:
                self._commit_timer = self.loop.call_later(due, self._commit_timer_fired)
            return
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self._write_next()

    def _commit_timer_fired(self) -> None:
        self._commit_timer = None
        self._commit_when_due()

    def _write_next(self) -> None:
        """Seal the open batch and hand it to the writer thread, unless nothing was recorded (or the store has
        failed: that was reported when it failed, and appends are refused since)."""
        try:
            batch = self.store.seal()
        except EngineFailed:
            batch = None
        self._writing = batch
        if batch is not None:
            done = self._writer.submit(self.store.write, batch)
            done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._written, batch, done))

    def _written(self, batch: Batch, done: Future[None]) -> None:
        """Back on the loop from the writer thread: the next batch, if due, goes to the disk before this
        one's producers are accepted and what it made durable is delivered, so that the disk is not idle while
        the loop works (with 16 producers waiting, that idle time made a commit's cycle twice its write)."""
        self._writing = None
        error = done.exception()
        if error is not None:
            if isinstance(error, EngineFailed):
                log.error("%s", error)
                self.endpoint.failed(batch, error)
            else:
                log.error("internal error in the store's group commit", exc_info=error)
            return
        try:
            self._commit_when_due()
            self.endpoint.committed(batch)
            self._commit_when_due()  # what the completion itself recorded
        except Exception:
            log.exception("internal error in the store's group commit")
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        deadline = self.store.next_deadline()
        if deadline is None or (self._expiry_at is not None and self._expiry_at <= deadline):
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = self.loop.call_later(max(0.0, deadline - time.time()), self._expire)

    def _expire(self) -> None:
        self._expiry = self._expiry_at = None
        try:
            self.endpoint.expire()
        except Exception:
            log.exception("internal error in the store's expiry")
        self.wake()

    async def close(self) -> None:
        """After the connections have gone: the last commit, then the file is closed."""
        for timer in (self._expiry, self._commit_timer):
            if timer is not None:
                timer.cancel()
        while self._writing is not None:  # the writer runs in order: past this no-op, the write is back
            await self.loop.run_in_executor(self._writer, _nothing)
        self.endpoint.turn()
        try:
            self.store.close()  # the last commit, on the loop: nothing else runs any more
        except EngineFailed as error:
            log.error("%s", error)
        self._writer.shutdown()
        if self._lock is not None:
            self._lock.close()
        log.info("store %s closed: %s", self.store.engine.path, self.endpoint.counters)


def _nothing() -> None:
    pass


def _lock(path: Path) -> IO[bytes]:
    """Hold `<store>.lock` exclusively (released by the kernel if the process dies): two routers on one store
    file would each take the other's messages for their own."""
    lock = open(f"{path}.lock", "ab")  # noqa: SIM115 (held open for as long as the store is)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(
            f"meshbus: error: the store {path} is in use by another router; give each router its own store "
            "(the [store] path, or a distinct [router] id for the default path)"
        ) from None
    return lock
