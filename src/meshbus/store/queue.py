"""A queue address: an append-only log of messages with one cursor per subscription group.

Rules of this module:
1. It owns the state of one queue: which messages are retained, which group has finished which message,
   which consumer holds which delivery, each message's failed-delivery count per group, and the limits.
   It never touches files, sockets, threads or a clock: time arrives as `now` (seconds since the epoch,
   since message expiry times are wall-clock times).
2. Every change that must survive a restart is reported as it happens to a `Journal` (the engine, which
   records it in its next group commit). Nothing here waits for the journal. A message whose payload is in
   memory is handed out as soon as it is appended; one that is not (the cache was full) only once it is
   below the offset declared durable (`durable`), since it is read back from the file. A message finished
   before its append was written is never written (the engine drops the pair). When a producer is
   accepted (once the message is written, or finished by every group) is decided elsewhere (store.py).
3. Groups (one per consumer pool): every group receives every message appended from its start; the
   consumers of one group share them (each message goes to one of them). The first group of a queue
   starts at the oldest retained message, so notifications sent before any listener existed reach the
   first listener; a group created while others exist starts at the tail: it receives what is appended
   from then on, as a newly bound queue would. A group outlives its consumers (a restarting listener misses
   nothing) until `drop_group`.
4. A message is retained, and counts against the limits, from `append` until every group has finished it
   (accepted it, or it was dead-lettered for that group) or it expires. While the queue has no group at
   all, messages are retained for the first one.
5. Order: a group is handed the messages made available again (released, modified, returned by a
   detaching consumer) first, lowest offset first, then new messages in append order.
6. Delivery count (the AMQP header's delivery-count): per group, raised by released, modified, a consumer
   detaching with the message in flight, and recovery (for what was handed out before a crash). When it
   reaches `max_deliveries` the message is dead-lettered for that group; rejected dead-letters at once.
7. Limits: `append` refuses with `QueueFull` (never drops) when the queue holds `max_depth` messages or the
   message would take it past `max_bytes`; `room()` says how many more it can take, for producer credit.
8. Expiry: an expired message is never handed out. `expire(now)` purges expired messages; one in flight
   when it expires is deleted when its last holder settles it.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, fields
from typing import Final, Protocol

# The edge's reference to a consumer (its link): opaque here, used as a dictionary key.
Consumer = Hashable

DEFAULT_GROUP: Final = ""  # the group of consumers that name no pool


class Settlement(enum.Enum):
    """A consumer's outcome for a delivery (the AMQP terminal states)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    MODIFIED = "modified"


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """What one queue may hold and how it treats failing messages."""

    max_depth: int = 1_000_000  # retained messages
    max_bytes: int = 1 << 30  # retained payload bytes
    max_deliveries: int = 10  # delivery attempts per group before dead-lettering; 0: no limit
    dead_letter: str | None = None  # the address dead letters go to; None: they are dropped (counted)
    cache_bytes: int = 64 << 20  # payload bytes kept in memory; the others are read back from the engine

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_bytes", "max_deliveries", "cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"queue limit {name} must not be negative, got {getattr(self, name)}")


class QueueFull(Exception):
    """The queue refuses a message: it is not stored, and the producer is told so."""

    condition: Final = "amqp:resource-limit-exceeded"

    def __init__(self, address: str, reason: str, limit: str) -> None:
        super().__init__(
            f"queue {address!r} is full: {reason}; the message was not stored. Consume or purge the "
            f"queue, or raise its {limit}"
        )
        self.address = address
        self.limit = limit


@dataclass(slots=True, eq=False)
class Message:
    """One message of the log. Its payload is kept in memory while the cache has room."""

    offset: int
    size: int
    deadline: float | None  # expiry, seconds since the epoch
    payload: bytes | None = None  # None: only the engine has it
    pending: int = 0  # groups that have not finished with it
    held: int = 0  # groups that have it in flight


@dataclass(slots=True, eq=False)
class ConsumerState:
    handle: Consumer
    group: Group
    credit: int = 0
    inflight: set[int] = field(default_factory=set)  # offsets delivered to it and not settled


@dataclass(slots=True, eq=False)
class Group:
    """A subscription: consumers sharing every message appended from `start` on."""

    name: str
    start: int  # the first offset it receives
    cursor: int  # the next offset it has never been handed
    finished: set[int] = field(default_factory=set)  # retained messages it has finished (others have not)
    requeued: list[int] = field(default_factory=list)  # heap of offsets made available again
    failures: dict[int, int] = field(default_factory=dict)  # delivery count by offset, where not zero
    inflight: dict[int, ConsumerState] = field(default_factory=dict)
    consumers: list[ConsumerState] = field(default_factory=list)
    rotation: int = 0  # consumers take turns


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a consumer; `count` is its delivery count for the consumer's group."""

    consumer: Consumer
    group: str
    message: Message
    count: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on, to be appended to the `address` queue."""

    address: str
    source: str
    group: str
    message: Message
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A group as the engine read it back: `marks` holds (delivery count, finished) by offset."""

    name: str
    start: int
    cursor: int
    marks: dict[int, tuple[int, bool]]


@dataclass(slots=True)
class QueueCounters:
    """What the queue did, for its operator."""

    appended: int = 0
    refused: int = 0
    delivered: int = 0
    acknowledged: int = 0
    requeued: int = 0
    dead_lettered: int = 0
    expired: int = 0

    def __str__(self) -> str:
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self))


class Journal(Protocol):
    """Where a queue reports the changes that must survive a restart (the engine implements it)."""

    def appended(self, queue: Queue, message: Message, payload: bytes) -> None: ...

    def finished(self, queue: Queue, group: Group, offset: int) -> None:
        """The group is done with a message that stays for other groups."""

    def failed(self, queue: Queue, group: Group, offset: int, count: int) -> None:
        """The message's delivery count for the group is now `count`."""

    def deleted(self, queue: Queue, message: Message, marked: bool) -> None:
        """The message left the log; `marked`: some group had recorded a mark (finished, count) for it."""

    def advanced(self, queue: Queue, group: Group) -> None:
        """The group's cursor moved (may be recorded lazily: recovery only uses it to raise counts)."""

    def group_created(self, queue: Queue, group: Group) -> None: ...

    def group_dropped(self, queue: Queue, group: Group) -> None: ...


class Queue:
    """One queue address."""

    def __init__(self, address: str, limits: QueueLimits, journal: Journal, next_offset: int = 0) -> None:
        self.address = address
        self.limits = limits
        self._journal = journal
        self._log: dict[int, Message] = {}  # by offset, in offset order
        self._next_offset = next_offset
        self._durable_end = next_offset  # messages below this offset are durable
        self.groups: dict[str, Group] = {}
        self._consumers: dict[Consumer, ConsumerState] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, offset)
        self._ready: dict[Group, None] = {}  # groups that may have something to hand out (ordered set)
        self.bytes = 0
        self.cached_bytes = 0
        self.counters = QueueCounters()

    @property
    def depth(self) -> int:
        return len(self._log)

    @property
    def next_offset(self) -> int:
        return self._next_offset

    def messages(self) -> Iterable[Message]:
        """The retained messages, oldest first."""
        return self._log.values()

    def get(self, offset: int) -> Message | None:
        return self._log.get(offset)

    # -- producers -----------------------------------------------------------------------------------

    def room(self) -> int:
        """How many more messages the queue can take before refusing (producer credit should not exceed
        it); 0 once the bytes are used up."""
        if self.bytes >= self.limits.max_bytes:
            return 0
        return max(0, self.limits.max_depth - len(self._log))

    def append(self, payload: bytes, deadline: float | None, now: float) -> Message | None:
        """Store a message at the tail; None if it had already expired (nothing stored). Raises QueueFull."""
        if deadline is not None and deadline <= now:
            self.counters.expired += 1
            return None
        size = len(payload)
        limits = self.limits
        if len(self._log) >= limits.max_depth:
            self.counters.refused += 1
            raise QueueFull(self.address, f"it holds {len(self._log)} messages", "max_depth")
        if self.bytes + size > limits.max_bytes:
            self.counters.refused += 1
            raise QueueFull(
                self.address,
                f"a {size}-byte message would take it past {limits.max_bytes} bytes ({self.bytes} held)",
                "max_bytes",
            )
        offset = self._next_offset
        self._next_offset = offset + 1
        cached = self.cached_bytes + size <= limits.cache_bytes
        message = Message(offset, size, deadline, payload if cached else None, len(self.groups))
        self._log[offset] = message
        self.bytes += size
        if cached:
            self.cached_bytes += size
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, offset))
        self.counters.appended += 1
        self._journal.appended(self, message, payload)
        if cached:
            self._offer_to_groups()
        return message

    def keep(self, message: Message, payload: bytes) -> None:
        """A payload read back from the engine stays in memory while the cache has room."""
        size = message.size
        fits = self.cached_bytes + size <= self.limits.cache_bytes
        if fits and message.payload is None and message.offset in self._log:
            message.payload = payload
            self.cached_bytes += size

    def durable(self, end: int) -> None:
        """Every message below offset `end` is durable: those not in memory may be handed out too."""
        if end > self._durable_end:
            self._durable_end = end
            self._offer_to_groups()

    def _offer_to_groups(self) -> None:
        """There may be more to hand out: every group with consumers is looked at again."""
        for group in self.groups.values():
            if group.consumers:
                self._ready[group] = None

    # -- consumers -----------------------------------------------------------------------------------

    def attach(self, consumer: Consumer, group_name: str = DEFAULT_GROUP) -> Group:
        """A consumer joins a group, which is created if it is the first of its pool."""
        if consumer in self._consumers:
            raise ValueError(f"consumer {consumer!r} is already attached to queue {self.address!r}")
        group = self.groups.get(group_name)
        if group is None:
            group = self._create_group(group_name)
        state = ConsumerState(consumer, group)
        group.consumers.append(state)
        self._consumers[consumer] = state
        return group

    def _create_group(self, name: str) -> Group:
        if self.groups:
            start = self._next_offset
        else:
            start = next(iter(self._log), self._next_offset)
            for message in self._log.values():
                message.pending = 1
        group = Group(name, start, start)
        self.groups[name] = group
        self._journal.group_created(self, group)
        return group

    def flow(self, consumer: Consumer, credit: int) -> None:
        """The consumer may now take `credit` more deliveries (its link credit)."""
        state = self._consumers[consumer]
        state.credit = credit
        if credit > 0:
            self._ready[state.group] = None

    def deliveries(self, now: float) -> list[Delivery]:
        """Hand out what the consumers' credit allows."""
        out: list[Delivery] = []
        while self._ready:
            group, _ = self._ready.popitem()
            self._hand_out(group, now, out)
        self.counters.delivered += len(out)
        return out

    def _hand_out(self, group: Group, now: float, out: list[Delivery]) -> None:
        consumers = group.consumers
        count = len(consumers)
        turn = group.rotation
        cursor = group.cursor
        idle = 0  # consumers in a row found without credit
        while idle < count:
            state = consumers[turn % count]
            turn += 1
            if state.credit <= 0:
                idle += 1
                continue
            message = self._next(group, now)
            if message is None:
                break
            idle = 0
            offset = message.offset
            state.credit -= 1
            state.inflight.add(offset)
            group.inflight[offset] = state
            message.held += 1
            out.append(Delivery(state.handle, group.name, message, group.failures.get(offset, 0)))
        group.rotation = turn % count if count else 0
        if group.cursor != cursor:
            self._journal.advanced(self, group)

    def _next(self, group: Group, now: float) -> Message | None:
        """The group's next available message, skipping (and purging) expired ones."""
        log = self._log
        requeued = group.requeued
        while requeued:
            message = log.get(heapq.heappop(requeued))
            if message is None:
                continue  # expired meanwhile
            if message.deadline is not None and message.deadline <= now:
                self._expire(message)
                continue
            return message
        while group.cursor < self._next_offset:
            offset = group.cursor
            message = log.get(offset)
            if message is not None and message.payload is None and offset >= self._durable_end:
                break  # to be read back from the file once written
            group.cursor = offset + 1
            if message is None or offset in group.finished:
                continue
            if message.deadline is not None and message.deadline <= now:
                self._expire(message)
                continue
            return message
        return None

    def settle(self, consumer: Consumer, offset: int, outcome: Settlement, now: float) -> DeadLetter | None:
        """A consumer settled a delivery. Returns the dead letter to append elsewhere, if it makes one.
        A settlement of anything the consumer does not hold is ignored."""
        state = self._consumers.get(consumer)
        if state is None or offset not in state.inflight:
            return None
        state.inflight.remove(offset)
        group = state.group
        del group.inflight[offset]
        message = self._log[offset]
        message.held -= 1
        expired = message.deadline is not None and message.deadline <= now
        dead = None
        if outcome is Settlement.ACCEPTED:
            self.counters.acknowledged += 1
            self._finish(group, message)
        elif outcome is Settlement.REJECTED:
            dead = self._dead_letter(group, message, group.failures.get(offset, 0), "rejected by a consumer")
        elif not expired:
            dead = self._requeue(group, message)
        if expired and not message.held and offset in self._log:
            self._expire(message)
        return dead

    def detach(self, consumer: Consumer, now: float) -> list[DeadLetter]:
        """A consumer went away: what it held is available to its group again, delivery count raised."""
        state = self._consumers[consumer]
        dead = [
            letter
            for offset in sorted(state.inflight)
            if (letter := self.settle(consumer, offset, Settlement.MODIFIED, now)) is not None
        ]
        del self._consumers[consumer]
        state.group.consumers.remove(state)
        return dead

    def drop_group(self, name: str) -> None:
        """Forget a subscription without consumers: what only it still needed is deleted."""
        group = self.groups[name]
        if group.consumers:
            raise ValueError(
                f"group {name!r} of queue {self.address!r} still has {len(group.consumers)} consumers; "
                "detach them first"
            )
        del self.groups[name]
        self._ready.pop(group, None)
        self._journal.group_dropped(self, group)
        for message in list(self._log.values()):
            if message.offset >= group.start and message.offset not in group.finished:
                message.pending -= 1
                if message.pending <= 0 and self.groups:
                    self._delete(message, marked=False)

    # -- settlement ----------------------------------------------------------------------------------

    def _finish(self, group: Group, message: Message) -> None:
        offset = message.offset
        had_count = group.failures.pop(offset, None) is not None
        message.pending -= 1
        if message.pending > 0:
            group.finished.add(offset)
            self._journal.finished(self, group, offset)
        else:
            self._delete(message, marked=had_count)

    def _requeue(self, group: Group, message: Message) -> DeadLetter | None:
        offset = message.offset
        count = group.failures.get(offset, 0) + 1
        limit = self.limits.max_deliveries
        if limit and count >= limit:
            return self._dead_letter(group, message, count, f"delivery failed {count} times")
        group.failures[offset] = count
        self._journal.failed(self, group, offset, count)
        heapq.heappush(group.requeued, offset)
        if group.consumers:
            self._ready[group] = None
        self.counters.requeued += 1
        return None

    def _dead_letter(self, group: Group, message: Message, count: int, reason: str) -> DeadLetter | None:
        self.counters.dead_lettered += 1
        self._finish(group, message)
        address = self.limits.dead_letter
        if address is None:
            return None
        return DeadLetter(address, self.address, group.name, message, count, reason)

    # -- deletion and time ---------------------------------------------------------------------------

    def _delete(self, message: Message, marked: bool) -> None:
        offset = message.offset
        del self._log[offset]
        self.bytes -= message.size
        if message.payload is not None:
            self.cached_bytes -= message.size
        for group in self.groups.values():
            if offset in group.finished:
                group.finished.remove(offset)
                marked = True
            if group.failures.pop(offset, None) is not None:
                marked = True
        self._journal.deleted(self, message, marked)

    def _expire(self, message: Message) -> None:
        """Delete an expired message unless a group holds it (then it goes when settled)."""
        if not message.held:
            self.counters.expired += 1
            self._delete(message, marked=False)

    def expire(self, now: float) -> int:
        """Purge the messages expired by `now`; returns how many were deleted."""
        deadlines = self._deadlines
        before = self.counters.expired
        while deadlines and deadlines[0][0] <= now:
            message = self._log.get(heapq.heappop(deadlines)[1])
            if message is not None:
                self._expire(message)
        return self.counters.expired - before

    def next_deadline(self) -> float | None:
        """When the earliest retained message expires (for the edge's timer)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._log:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    # -- recovery ------------------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        address: str,
        limits: QueueLimits,
        journal: Journal,
        next_offset: int,
        messages: Iterable[tuple[int, float | None, int]],
        groups: Iterable[GroupRecord],
    ) -> Queue:
        """Rebuild a queue from what the engine read back: `messages` as (offset, deadline, size) in offset
        order. What a group had been handed and not finished is available to it again, count raised."""
        queue = cls(address, limits, journal, next_offset)
        records = list(groups)
        restored = [(Group(record.name, record.start, record.cursor), record.marks) for record in records]
        for group, _ in restored:
            queue.groups[group.name] = group
        log = queue._log
        deadlines = queue._deadlines
        raised: list[tuple[Group, int, int]] = []
        total = 0
        for offset, deadline, size in messages:
            message = Message(offset, size, deadline)
            log[offset] = message
            total += size
            if deadline is not None:
                deadlines.append((deadline, offset))
            pending = 0
            for group, marks in restored:
                if offset < group.start:
                    continue
                count, finished = marks.get(offset, (0, False))
                if finished:
                    group.finished.add(offset)
                    continue
                pending += 1
                if offset < group.cursor:  # handed out before the restart and not finished
                    count += 1
                    group.requeued.append(offset)  # ascending: already a heap
                    raised.append((group, offset, count))
                if count:
                    group.failures[offset] = count
            message.pending = pending
        queue.bytes = total
        heapq.heapify(deadlines)
        for group, offset, count in raised:
            journal.failed(queue, group, offset, count)
        for message in [m for m in log.values() if m.pending == 0] if queue.groups else []:
            queue._delete(message, marked=True)  # finished by all, its deletion lost: complete it now
        return queue
