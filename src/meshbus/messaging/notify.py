"""Notifications: a Notifier publishes events by priority; listeners dispatch them to endpoint methods named
after the priority.

Addresses: `openstack.org/om/notify/anycast/<exchange>/<topic>.<priority>`: listeners of one topic share its
notifications; listeners of a `pool` share among the pool, and each pool (and the listeners in no pool)
gets every notification (the router's consumer pools).

Acknowledgement: a notification is accepted once its endpoints have returned; an endpoint returning
`REQUEUE` (on a listener that allows requeue) releases it, so it is delivered again (by the store, or by
the notifier's resend). An endpoint that raises is logged and counts as handled, as in oslo.messaging.
A notifier does not wait for that: its transport sends in the background (see `AsyncNotifier`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import random
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any, Final, Generic, NamedTuple, TypeVar

from meshbus.amqp.client import IncomingMessage
from meshbus.messaging import wire
from meshbus.messaging.serializer import Serializer
from meshbus.messaging.target import Target
from meshbus.messaging.transport import (
    AsyncService,
    AsyncTransport,
    BlockingService,
    Subscription,
    Transport,
    take,
)

log = logging.getLogger("meshbus.messaging.notify")

PRIORITIES: Final = ("audit", "debug", "info", "warn", "error", "critical", "sample")
DEFAULT_TOPICS: Final = ("notifications",)
DEFAULT_TIMEOUT: Final = 60.0  # seconds a notification may wait to be taken
# A listener's credit per link. Under load the router moves a listener's settlements and its next
# notifications in turns of a few milliseconds; a window of several turns lets the listener work on one batch
# while the router prepares the next, instead of the two taking turns (bench/README.md, session 11).
LISTENER_CREDIT: Final = 1000

R = TypeVar("R")


class NotificationResult:
    HANDLED: Final = "handled"
    REQUEUE: Final = "requeue"


# -- notifiers ----------------------------------------------------------------------------------------------

_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


_second: tuple[int, str] = (0, "")  # the last second timestamp() formatted, and its text


def timestamp() -> str:
    """Now in UTC as oslo's notifications carry it (str() of a naive datetime): the date and time formatted
    once a second, the microseconds each time (a third of the cost of formatting a datetime)."""
    global _second
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}" if micro else cached[1]  # as str(datetime): no zero fraction


def message_id() -> str:
    """A random (version 4) UUID as text, as oslo's notifications carry: str(uuid.uuid4()) at a quarter of
    its cost. An identifier, not a secret: `random` (reseeded in a forked child) rather than a system call
    per notification to the kernel's source."""
    digits = "%032x" % random.getrandbits(128)  # noqa: UP031 (a third faster than a format spec)
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{_VARIANT[digits[16]]}{digits[17:20]}-{digits[20:]}"


class _PriorityMethods(Generic[R]):
    """One method per priority, each `notify` with that priority."""

    def notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> R:
        raise NotImplementedError

    def audit(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "AUDIT")

    def debug(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "DEBUG")

    def info(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "INFO")

    def warn(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "WARN")

    warning = warn

    def error(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "ERROR")

    def critical(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "CRITICAL")

    def sample(self, ctxt: Any, event_type: str, payload: Any) -> R:
        return self.notify(ctxt, event_type, payload, "SAMPLE")


class AsyncNotifier(_PriorityMethods[Coroutine[Any, Any, None]]):
    """Publishes notifications to each of `topics` (on the transport's default exchange unless
    `exchange` is given).

    Each `info(...)`, `error(...)`... returns once the notification is on its way: the transport sends it in
    the background until a listener (or the store) takes it, resending what is given back and what a
    dropped connection left unacknowledged, for `timeout` seconds at most. A producer is not held up by its
    consumers, and many notifications are in flight at once. One never taken is logged; `flush()` waits
    until all are taken and raises the first that was not. Past the transport's `BACKLOG_LIMIT` not yet
    taken, a notification waits for room. `at_least_once=False`: pre-settled, written once, never resent."""

    def __init__(
        self,
        transport: AsyncTransport,
        publisher_id: str | None = None,
        *,
        topics: Iterable[str] = DEFAULT_TOPICS,
        exchange: str | None = None,
        serializer: Serializer | None = None,
        retry: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        at_least_once: bool = True,
    ) -> None:
        self.transport = transport
        self.publisher_id = publisher_id
        self.targets = [Target(exchange=exchange, topic=topic) for topic in topics]
        self.serializer = serializer or Serializer()
        self.retry = retry
        self.timeout = timeout
        self.at_least_once = at_least_once
        self._addresses: dict[str, list[str]] = {}  # by priority, one per target

    def prepare(self, publisher_id: str | None = None, retry: int | None = None) -> AsyncNotifier:
        prepared = AsyncNotifier.__new__(AsyncNotifier)
        prepared.__dict__.update(self.__dict__)
        if publisher_id is not None:
            prepared.publisher_id = publisher_id
        if retry is not None:
            prepared.retry = retry
        return prepared

    async def notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> None:
        for address, encoded in self._encode(ctxt, event_type, payload, priority):
            await self.transport.post(
                address, encoded, at_least_once=self.at_least_once, timeout=self.timeout, retry=self.retry
            )

    async def flush(self) -> None:
        """Wait until every notification sent on the transport so far has been taken or given up, and raise
        the first given up since the last flush."""
        await self.transport.flush()

    def _encode(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> list[tuple[str, bytes]]:
        """The notification for each topic: its address and its message. On the caller's thread, so that
        what cannot be serialized raises there."""
        notification = {
            "message_id": message_id(),
            "publisher_id": self.publisher_id,
            "event_type": event_type,
            "priority": priority.upper(),
            "payload": self.serializer.serialize_entity(ctxt, payload),
            "timestamp": timestamp(),
        }
        context = self.serializer.serialize_context(ctxt)
        addresses = self._addresses.get(priority)
        if addresses is None:
            addresses = [self.transport.notify_address(target, priority) for target in self.targets]
            self._addresses[priority] = addresses
        return [
            (address, wire.encode_request(address, notification, context, envelope=True))
            for address in addresses
        ]


class Notifier(_PriorityMethods[None]):
    """The blocking face of `AsyncNotifier` (same arguments), safe from many threads."""

    def __init__(self, transport: Transport, publisher_id: str | None = None, **options: Any) -> None:
        self.transport = transport
        self.aio = AsyncNotifier(transport.aio, publisher_id, **options)

    def prepare(self, publisher_id: str | None = None, retry: int | None = None) -> Notifier:
        prepared = Notifier.__new__(Notifier)
        prepared.transport = self.transport
        prepared.aio = self.aio.prepare(publisher_id, retry)
        return prepared

    def notify(self, ctxt: Any, event_type: str, payload: Any, priority: str) -> None:
        aio = self.aio
        for address, encoded in aio._encode(ctxt, event_type, payload, priority):
            self.transport.post(
                address, encoded, at_least_once=aio.at_least_once, timeout=aio.timeout, retry=aio.retry
            )

    def flush(self) -> None:
        """`AsyncNotifier.flush`, blocking."""
        self.transport.flush()


# -- listeners ----------------------------------------------------------------------------------------------


class NotificationFilter:
    """Lets through only notifications whose fields match: `publisher_id` and `event_type` are regular
    expressions (matched from the start); `context` and `payload` map keys to regular expressions (for
    text values) or to values compared for equality."""

    def __init__(
        self,
        context: Mapping[str, Any] | None = None,
        publisher_id: str | None = None,
        event_type: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        self.context = dict(context or {})
        self.publisher_id = re.compile(publisher_id) if publisher_id else None
        self.event_type = re.compile(event_type) if event_type else None
        self.metadata = dict(metadata or {})
        self.payload = dict(payload or {})

    def match(
        self,
        ctxt: Any,
        publisher_id: str | None,
        event_type: str | None,
        metadata: Mapping[str, Any],
        payload: Any,
    ) -> bool:
        """Whether a notification passes. A context or payload that is not a mapping (a serializer's object)
        has no fields: a rule on its fields does not match it."""
        if self.publisher_id and not self.publisher_id.match(publisher_id or ""):
            return False
        if self.event_type and not self.event_type.match(event_type or ""):
            return False
        context = ctxt if isinstance(ctxt, Mapping) else {}
        fields = payload if isinstance(payload, Mapping) else {}
        return all(
            _matches(rules, values)
            for rules, values in ((self.context, context), (self.metadata, metadata), (self.payload, fields))
        )


def _matches(rules: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    for key, expected in rules.items():
        if key not in values:
            return False
        value = values[key]
        if isinstance(expected, str) and isinstance(value, str):
            if not re.match(expected, value):
                return False
        elif value != expected:
            return False
    return True


class _Batch:
    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], IncomingMessage]] = []
        self.timer: asyncio.TimerHandle | None = None


class AsyncNotificationListener(AsyncService):
    """Receives the notifications of `targets` (topics) for every priority some endpoint has a method for,
    and calls `method(ctxt, publisher_id, event_type, payload, metadata)` on each endpoint whose
    `filter_rule` (a `NotificationFilter`, optional) lets it through.

    With `batch_size` > 1 (or a `batch_timeout`), methods get lists of notifications instead, each a dict
    with ctxt, publisher_id, event_type, payload and metadata, once `batch_size` have arrived or
    `batch_timeout` seconds after the first. `pool`: see the module docstring. At most `credit`
    notifications are held or in work at once."""

    def __init__(
        self,
        transport: AsyncTransport,
        targets: Iterable[Target],
        endpoints: Iterable[object],
        *,
        pool: str | None = None,
        allow_requeue: bool = False,
        serializer: Serializer | None = None,
        executor: concurrent.futures.Executor | None = None,
        batch_size: int = 1,
        batch_timeout: float | None = None,
        credit: int = LISTENER_CREDIT,
    ) -> None:
        super().__init__(transport, executor)
        self.targets = list(targets)
        self.endpoints = list(endpoints)
        self.pool = pool
        self.allow_requeue = allow_requeue
        self.serializer = serializer or Serializer()
        self.batch_size = max(batch_size, 1)
        self.batch_timeout = batch_timeout
        self.credit = max(credit, self.batch_size)
        self.batching = self.batch_size > 1 or batch_timeout is not None
        # Per priority some endpoint has a method for, looked up once: the endpoints' methods, their filters,
        # and whether each is a coroutine function. Dispatch runs on the loop if one is, else wholly in the
        # executor.
        methods = {
            priority: [
                _Method(method, getattr(endpoint, "filter_rule", None), inspect.iscoroutinefunction(method))
                for endpoint in self.endpoints
                if callable(method := getattr(endpoint, priority, None))
            ]
            for priority in PRIORITIES
        }
        self._methods = {priority: found for priority, found in methods.items() if found}
        self.priorities = list(self._methods)
        if not self.priorities:
            raise ValueError(f"no endpoint has a method for any priority ({', '.join(PRIORITIES)})")
        self._batches: dict[str, _Batch] = {}
        self._coroutines = {
            priority: any(method.coroutine for method in methods)
            for priority, methods in self._methods.items()
        }

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(
                self.transport.notify_address(target, priority),
                functools.partial(self._on_notification, priority),
                self.credit,
                self.pool,
            )
            for target in self.targets
            for priority in self.priorities
        ]

    async def stop(self) -> None:
        """Take no more notifications; those held in a batch are dispatched now."""
        await super().stop()
        for priority in list(self._batches):
            self._flush(priority)

    def _on_notification(self, priority: str, message: IncomingMessage) -> None:
        incoming = take(message, "a notification", wire.decode_notification)
        if incoming is None:
            return
        body = incoming.body
        ctxt = self.serializer.deserialize_context(incoming.context)
        notification = {
            "ctxt": ctxt,
            "publisher_id": body.get("publisher_id"),
            "event_type": body.get("event_type"),
            "payload": self.serializer.deserialize_entity(ctxt, body.get("payload")),
            "metadata": {"message_id": body.get("message_id"), "timestamp": body.get("timestamp")},
        }
        if not self.batching:
            self._dispatch(priority, [(notification, message)])
            return
        batch = self._batches.setdefault(priority, _Batch())
        batch.messages.append((notification, message))
        if len(batch.messages) >= self.batch_size:
            self._flush(priority)
        elif batch.timer is None and self.batch_timeout is not None:
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(self.batch_timeout, self._flush, priority)

    def _flush(self, priority: str) -> None:
        batch = self._batches.pop(priority, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self._dispatch(priority, batch.messages)

    def _dispatch(self, priority: str, messages: Taken) -> None:
        if self._coroutines[priority]:
            self.run(self._dispatch_on_loop(priority, messages))
            return
        # Plain methods only: the whole dispatch runs in a worker.
        self.run_in_worker(
            functools.partial(self._dispatch_in_worker, priority, messages),
            functools.partial(self._settle, messages),
        )

    def _dispatch_in_worker(self, priority: str, messages: Taken) -> bool:
        """Call the endpoints; whether the notifications are to be requeued."""
        requeue = False
        try:
            for method, arguments in self._calls(priority, messages):
                try:
                    result = method.call(*arguments)
                except Exception:
                    result = _failed(method.call)
                requeue |= result == NotificationResult.REQUEUE and self.allow_requeue
        except Exception:
            _undispatchable(priority)
        return requeue

    async def _dispatch_on_loop(self, priority: str, messages: Taken) -> None:
        requeue = False
        try:
            for method, arguments in self._calls(priority, messages):
                try:
                    if method.coroutine:
                        result = await method.call(*arguments)
                    else:
                        loop = asyncio.get_running_loop()
                        call = functools.partial(method.call, *arguments)
                        result = await loop.run_in_executor(self.executor, call)
                except Exception:
                    result = _failed(method.call)
                requeue |= result == NotificationResult.REQUEUE and self.allow_requeue
        except Exception:
            _undispatchable(priority)
        self._settle(messages, requeue)

    def _calls(self, priority: str, messages: Taken) -> Iterator[tuple[_Method, tuple[Any, ...]]]:
        """Each endpoint method to call, with its arguments: one call per notification its filter lets
        through, or one per batch."""
        for method in self._methods[priority]:
            rule = method.rule
            chosen = [n for n, _ in messages if rule is None or rule.match(**_filter_fields(n))]
            if not chosen:
                continue
            if self.batching:
                yield method, (chosen,)
            else:
                for notification in chosen:
                    yield method, _arguments(notification)

    def _settle(self, messages: Taken, requeue: bool) -> None:
        """On the loop: acknowledge (or give back) what was dispatched."""
        for _, message in messages:
            if requeue:
                message.release()
            else:
                message.accept()


Taken = list[tuple[dict[str, Any], IncomingMessage]]


class _Method(NamedTuple):
    """An endpoint's method for one priority."""

    call: Callable[..., Any]
    rule: NotificationFilter | None
    coroutine: bool


def _failed(method: Callable[..., Any]) -> str:
    log.exception("notification endpoint %s failed; the notification counts as handled", method)
    return NotificationResult.HANDLED


def _undispatchable(priority: str) -> None:
    # A notification left unsettled would hold its credit, and its notifier, until the time-out.
    log.exception("%s notifications could not be dispatched; they count as handled", priority)


def _arguments(notification: dict[str, Any]) -> tuple[Any, ...]:
    return (
        notification["ctxt"],
        notification["publisher_id"],
        notification["event_type"],
        notification["payload"],
        notification["metadata"],
    )


def _filter_fields(notification: dict[str, Any]) -> dict[str, Any]:
    return {
        "ctxt": notification["ctxt"],
        "publisher_id": notification["publisher_id"],
        "event_type": notification["event_type"],
        "metadata": notification["metadata"],
        "payload": notification["payload"],
    }


class NotificationListener(BlockingService):
    """The blocking face of `AsyncNotificationListener` (same arguments): endpoint methods run in a thread
    pool of `max_workers` threads."""

    def __init__(
        self,
        transport: Transport,
        targets: Iterable[Target],
        endpoints: Iterable[object],
        *,
        max_workers: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(transport, max_workers, "meshbus-notify")
        self.aio = AsyncNotificationListener(
            transport.aio, targets, endpoints, executor=self.executor, **options
        )
