"""The store: the queues of one database and the engine that keeps them, behind the calls the router makes.

Rules of this module:
1. It routes each call to its queue (queues are created on first use), moves dead letters to their queue,
   fills in the payloads a delivery needs from the engine, and reports durability: a token given with an
   append or a settlement comes back from `completed` once the batch carrying it is written; an append's
   comes back from `finished_before_written` instead if every group finished the message before its batch
   was sealed (nothing is left to write, and its dead letter, if any, is durable first).
2. It reads no clock and opens no socket; it does file I/O only through the engine, and only where the
   caller asks (`open`, `write`, `flush`, `close`, and payload reads in `deliveries` and for dead letters).
3. Who drives it: one thread (the event loop) calls everything except `write`, which may run on a writer
   thread; `seal` -> `write` -> `completed` is one group commit, and commits run one at a time.
4. When to seal (`commit_due`): at once, unless a consumer holds a message of the open batch. Then the
   batch waits up to `commit_delay` from when it began, and what is accepted meanwhile is never written:
   a consumer that keeps up costs the disk nothing, and its producers wait for it rather than the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshbus.store.engine import Batch, Engine
from meshbus.store.queue import (
    DEFAULT_GROUP,
    Consumer,
    DeadLetter,
    Delivery,
    Queue,
    QueueFull,
    QueueLimits,
    Settlement,
)

# Producers get no more credit while this many payload bytes wait for a commit.
MAX_UNWRITTEN: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A delivery for the edge to send: `count` goes in the message header's delivery-count."""

    consumer: Consumer
    address: str
    offset: int
    count: int
    payload: bytes
    deadline: float | None  # expiry, seconds since the epoch


class Store:
    """The queues of one store file."""

    def __init__(
        self, engine: Engine, limits: Callable[[str], QueueLimits], commit_delay: float = 0.0
    ) -> None:
        self.engine = engine
        self._limits = limits
        self.commit_delay = commit_delay  # seconds
        self._open_since: float | None = None  # when commit_due first saw the open batch
        self.queues: dict[str, Queue] = {}
        self._consumers: dict[Consumer, Queue] = {}
        self._touched: dict[Queue, None] = {}  # queues that may have deliveries to hand out
        self.dead_letters_refused = 0  # dead letters their own queue refused (full): dropped

    @classmethod
    def open(
        cls,
        path: str | Path,
        limits: Callable[[str], QueueLimits],
        *,
        synchronous: str = "FULL",
        commit_delay: float = 0.0,
    ) -> Store:
        """Open (or create) the store file and rebuild its queues."""
        engine = Engine(path, synchronous=synchronous)
        store = cls(engine, limits, commit_delay)
        for state in engine.recover():
            store.queues[state.address] = Queue.restore(
                state.address, limits(state.address), engine, state.next_offset, state.messages, state.groups
            )
        store.flush()  # the delivery counts that recovery raised
        return store

    def queue(self, address: str) -> Queue:
        queue = self.queues.get(address)
        if queue is None:
            queue = self.queues[address] = Queue(address, self._limits(address), self.engine)
        return queue

    # -- producers -----------------------------------------------------------------------------------

    def append(self, address: str, payload: bytes, deadline: float | None, now: float, token: object) -> bool:
        """Store a producer's message; `token` comes back from `completed` once it is durable, or from
        `finished_before_written`. False: it had expired, nothing stored, no token. Raises QueueFull (the
        producer's message is refused) or EngineFailed (the file cannot be written)."""
        self.engine.check()
        queue = self.queue(address)
        message = queue.append(payload, deadline, now)
        if message is None:
            return False
        self.engine.when_stored(queue, message, token)
        self._touched[queue] = None
        return True

    def producer_credit(self, address: str, wanted: int) -> int:
        """How much of `wanted` credit a producer to this queue may be given now."""
        if self.engine.unwritten_bytes >= MAX_UNWRITTEN:
            return 0
        return min(wanted, self.queue(address).room())

    # -- consumers -----------------------------------------------------------------------------------

    def attach(self, address: str, consumer: Consumer, pool: str | None = None) -> None:
        queue = self.queue(address)
        queue.attach(consumer, DEFAULT_GROUP if pool is None else pool)
        self._consumers[consumer] = queue

    def flow(self, consumer: Consumer, credit: int) -> None:
        queue = self._consumers[consumer]
        queue.flow(consumer, credit)
        self._touched[queue] = None

    def deliveries(self, now: float) -> list[Outgoing]:
        """What the consumers' credit allows to send now, payloads included."""
        out: list[Outgoing] = []
        while self._touched:
            queue, _ = self._touched.popitem()
            handed = queue.deliveries(now)
            missing = [d.message.offset for d in handed if d.message.payload is None]
            stored = self.engine.read(queue.address, missing)
            for delivery in handed:
                out.append(self._outgoing(queue, delivery, stored))
        return out

    def _outgoing(self, queue: Queue, delivery: Delivery, stored: dict[int, bytes]) -> Outgoing:
        message = delivery.message
        payload = message.payload
        if payload is None:
            payload = stored[message.offset]
            queue.keep(message, payload)
        return Outgoing(
            delivery.consumer, queue.address, message.offset, delivery.count, payload, message.deadline
        )

    def settle(
        self, consumer: Consumer, offset: int, outcome: Settlement, now: float, token: object = None
    ) -> None:
        """A consumer's outcome; `token` (if given) comes back from `completed` once it is durable."""
        queue = self._consumers[consumer]
        letter = queue.settle(consumer, offset, outcome, now)
        if letter is not None:
            self._bury(letter, now)
        if token is not None:
            self.engine.when_durable(token)
        self._touched[queue] = None

    def detach(self, consumer: Consumer, now: float) -> None:
        queue = self._consumers.pop(consumer)
        for letter in queue.detach(consumer, now):
            self._bury(letter, now)
        self._touched[queue] = None

    def _bury(self, letter: DeadLetter, now: float) -> None:
        message = letter.message
        payload = message.payload
        if payload is None:
            payload = self.engine.read(letter.source, [message.offset])[message.offset]
        try:
            self.queue(letter.address).append(payload, message.deadline, now)
        except QueueFull:
            self.dead_letters_refused += 1
        # A message dead-lettered before it was written lives on only in the open batch: its producer's
        # token waits for that batch (as may others finished in the same call: the safe side).
        for token in self.engine.take_finished_unwritten():
            self.engine.when_durable(token)

    def finished_before_written(self) -> list[object]:
        """Tokens of appends that every group finished before they were written (accepted, expired, their
        group dropped): final now, since last asked."""
        return self.engine.take_finished_unwritten()

    def drop_group(self, address: str, group: str) -> None:
        self.queues[address].drop_group(group)

    # -- time ----------------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        return sum(queue.expire(now) for queue in self.queues.values())

    def next_deadline(self) -> float | None:
        deadlines = [d for queue in self.queues.values() if (d := queue.next_deadline()) is not None]
        return min(deadlines, default=None)

    # -- group commit --------------------------------------------------------------------------------

    def commit_due(self, now: float) -> float | None:
        """Seconds until the open batch should be sealed (0: now), or None if it needs no writing. `now`:
        any clock's seconds, the same at every call."""
        if not self.engine.has_records:
            self._open_since = None
            return None
        if self._open_since is None:
            self._open_since = now
        if self.commit_delay > 0 and self._held_unwritten():
            return max(0.0, self._open_since + self.commit_delay - now)
        return 0.0

    def _held_unwritten(self) -> bool:
        """Whether a consumer holds a message of the open batch."""
        for address, offset in self.engine.unwritten():
            message = self.queues[address].get(offset)
            if message is not None and message.held:
                return True
        return False

    def seal(self) -> Batch | None:
        self._open_since = None
        return self.engine.seal()

    def write(self, batch: Batch) -> None:
        """On any one thread at a time: make the batch durable (raises EngineFailed)."""
        self.engine.write(batch)

    def completed(self, batch: Batch) -> list[object]:
        """`batch` was written: its messages not kept in memory may be delivered too; returns the tokens it
        made durable."""
        for address, end in batch.ends.items():
            queue = self.queues[address]
            queue.durable(end)
            self._touched[queue] = None
        return self.engine.completed(batch)

    def flush(self) -> list[object]:
        """One group commit, synchronously; returns the tokens made durable."""
        batch = self.seal()
        if batch is None:
            return []
        self.write(batch)
        return self.completed(batch)

    def close(self) -> None:
        self.flush()
        self.engine.close()
