"""Transports: one connection to the router mesh per transport, shared by every client, server, notifier and
listener made on it, with the one reply link all of its calls share.

`AsyncTransport` lives on the caller's asyncio loop. `Transport` is its blocking face: it runs an
`AsyncTransport` on a loop in a thread of its own, so any number of threads may use it at once.

Rules of this module:
1. It turns a URL into a connection and delivers: it sends a request until it is taken (resending what the
   router gave back, within the retry budget), and matches replies to calls by correlation id. A call or
   cast has its caller wait for the outcome; a post (a notification) does not: it joins the transport's
   bounded backlog, and `flush()` reports what was never taken.
2. What a request or reply looks like is wire.py's; what a call or a server does is rpc.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote

from meshbus.amqp.client import (
    ACCEPTED,
    MODIFIED,
    REJECTED,
    ClientConnection,
    ConnectionClosed,
    Host,
    IncomingMessage,
    Options,
    Outcome,
    OutcomeUnknown,
    Receiver,
    describe_outcome,
)
from meshbus.messaging import green, wire
from meshbus.messaging.deadlines import Deadlines
from meshbus.messaging.exceptions import (
    MessageDeliveryFailure,
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
)
from meshbus.messaging.serializer import to_primitive
from meshbus.messaging.target import Target

log = logging.getLogger("meshbus.messaging")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R")

SCHEMES: Final = ("meshbus", "amqp")
DEFAULT_PORT: Final = 5672
DEFAULT_URL: Final = "meshbus://127.0.0.1:5672/"
# A RELEASED request was not taken by anyone; resending it finds a server that started meanwhile, another
# server of the topic (one may release while stopping), or a mesh whose routes settled (a router that just
# joined may not know every address for a few milliseconds). Resends wait RELEASED_DELAY, doubling: 28 ms in
# all, within the 50 ms promised for fast failure. After this many, nobody serves the address.
RELEASED_RESENDS: Final = 3
RELEASED_DELAY: Final = 0.004
# A consumer that failed (or a connection that dropped) may fail again at once: resends back off, from
# this delay doubling up to the next.
RESEND_DELAY: Final = 0.01
MAX_RESEND_DELAY: Final = 1.0
# A reply given back is resent this many times, backing off from RESEND_DELAY: 0.6 s in all, long enough for
# the mesh to settle a changed route, short for a caller that is gone.
REPLY_RESENDS: Final = 6
# Threads of an asyncio server's pool for its endpoints' plain methods, unless it is given an executor.
DEFAULT_WORKERS: Final = 16
# Casts sent in the background (notifications) and not yet taken: past this many on a transport, a poster
# waits until half are. It bounds the memory they hold and how far producers run ahead of consumers.
BACKLOG_LIMIT: Final = 1000
# Seconds close() gives the backlog to be taken before it drops the rest, and says so.
CLOSE_LINGER: Final = 5.0


@dataclass(slots=True)
class TransportURL:
    """`meshbus://[user:pass@]host[:port][,[user:pass@]host[:port]]...[/virtual_host][?option=value&...]`.

    Hosts are tried in turn (fail-over). A virtual host is a namespace of its own: it is part of every
    address, as the oslo.messaging AMQP 1.0 driver's `pseudo_vhost` makes them, so that services on that
    driver with the same virtual host meet these. Options: `idle_timeout` (s), `reconnect_delay` (s),
    `max_reconnect_delay` (s), `sender_idle_timeout` (s), `container_id`.
    """

    hosts: list[Host]
    options: dict[str, str] = field(default_factory=dict)
    virtual_host: str | None = None

    @classmethod
    def parse(cls, url: str) -> TransportURL:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(f"transport URL {url!r}: expected meshbus://host:port/ (or amqp://)")
        netloc, _, tail = rest.partition("/")
        netloc, _, query = netloc.partition("?")
        path, _, tail_query = tail.partition("?")
        query = query or tail_query
        hosts: list[Host] = []
        user = password = None
        for part in filter(None, netloc.split(",")):
            credentials, at, address = part.rpartition("@")
            if at:  # a host without credentials uses the previous host's
                name, _, secret = credentials.partition(":")
                user, password = unquote(name), unquote(secret)
            host, port = _split_host(address, url)
            hosts.append(Host(host, port, user, password))
        if not hosts:
            hosts.append(Host("127.0.0.1", DEFAULT_PORT))
        # "/" (RabbitMQ's default virtual host, as in rabbit://host//) is the default here too: none.
        return cls(hosts, dict(parse_qsl(query)), unquote(path).strip("/") or None)

    def connection_options(self) -> Options:
        options = Options()
        for name, value in self.options.items():
            if name == "container_id":
                options.container_id = value
            elif name in ("idle_timeout", "reconnect_delay", "max_reconnect_delay", "sender_idle_timeout"):
                try:
                    setattr(options, name, float(value))
                except ValueError:
                    raise ValueError(f"transport URL option {name}={value!r}: expected seconds") from None
            else:
                raise ValueError(f"transport URL option {name!r} is unknown")
        return options


def _split_host(address: str, url: str) -> tuple[str, int]:
    if address.startswith("["):  # [IPv6]:port
        host, _, port = address[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = address.partition(":")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"transport URL {url!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"transport URL {url!r}: port {number} is out of range (1 to 65535)")
    return host or "127.0.0.1", number


class _Caller(Protocol):
    """Who waits for a `_Delivery`: a call's reply future, or a `_Cast`."""

    def done(self) -> bool: ...

    def set_exception(self, error: BaseException, /) -> None: ...


class _Delivery:
    """A request on its way, sent until it is taken. It is the connection's outcome sink for each attempt
    (see client.OutcomeSink): an outcome is acted on in the turn it arrives, with no future or task between.

    RELEASED: resent RELEASED_RESENDS times at most, after RELEASED_DELAY, doubling. MODIFIED (a consumer had
    it and failed) or an unknown outcome (the connection dropped): resent after a back-off that doubles from
    RESEND_DELAY. REJECTED: never resent. `retry` (None: until the caller's time-out) bounds its failed
    attempts: a consumer's failure, and each drop of or failed attempt to make the connection while the
    request waited for one (oslo's meaning: with `retry=0`, a request sent while the connection is down
    fails at once). Outcomes end `caller`: with an error, or, once taken, by `on_taken()`; a caller who
    gave up (time-out, cancel) has ended it already, and nothing more is sent."""

    __slots__ = (
        "address",
        "caller",
        "connection",
        "encode",
        "failed",
        "loop",
        "on_taken",
        "outage",
        "outage_failures",
        "released",
        "retry",
        "waits",
    )

    def __init__(
        self,
        waits: _ConnectionWaits,
        address: str,
        encode: bytes | Callable[[Callable[[], None]], bytes | None],
        retry: int | None,
        caller: _Caller,
        on_taken: Callable[[], None],
    ) -> None:
        self.waits = waits
        self.connection = waits.connection
        self.loop = self.connection.loop
        self.address = address
        # A cast's bytes; or, for a call, what gives the bytes of each attempt (its reply address changes
        # with a reconnect): None if not yet, and then it calls its argument when it can give them.
        self.encode = encode
        self.retry = retry
        self.caller = caller
        self.on_taken = on_taken
        self.released = self.failed = 0
        # The connection's failures counted so far: of the outage after its `opens`-th connection, how many.
        self.outage = self.outage_failures = 0

    def send(self) -> None:
        if self.caller.done():
            return
        if self.retry is not None and not self.connection.connected and not self.waits.add(self):
            return
        encode = self.encode
        try:
            payload = encode(self.send) if callable(encode) else encode
        except Exception as error:
            self.caller.set_exception(error)
            return
        if payload is not None:
            self.connection.send(self.address, payload, outcome=self)

    def done(self) -> bool:
        return self.caller.done()

    def set_exception(self, error: BaseException) -> None:
        if self.caller.done():
            return
        if isinstance(error, ConnectionClosed):
            self.caller.set_exception(_closed(self.address))
        elif not isinstance(error, OutcomeUnknown):
            self.caller.set_exception(error)
        elif self.count_outage():
            self._resend()
        else:
            gave_up = MessagingError(f"{self.address}: {error}; gave up after {self.retry} resends")
            gave_up.__cause__ = error
            self.caller.set_exception(gave_up)

    def set_result(self, outcome: Outcome) -> None:
        caller = self.caller
        if caller.done():
            return
        if outcome.state == ACCEPTED:
            self.on_taken()
        elif outcome.state == REJECTED:
            caller.set_exception(
                MessageDeliveryFailure(f"{self.address}: the message was {describe_outcome(outcome)}")
            )
        elif outcome.state == MODIFIED and not outcome.undeliverable_here:
            self.failed += 1
            if not self._within_retry():
                caller.set_exception(
                    MessageDeliveryFailure(
                        f"{self.address}: delivery failed {self.failed} times ({self.retry} resends)"
                    )
                )
            else:
                self._resend()
        else:
            self.released += 1
            if self.released > RELEASED_RESENDS:
                caller.set_exception(MessageUndeliverable(self.address, _detail(outcome)))
            else:
                self.loop.call_later(RELEASED_DELAY * 2 ** (self.released - 1), self.send)

    def count_outage(self) -> bool:
        """Count the connection's failures since this request last looked as failed attempts of its own;
        False once they are more than `retry`."""
        connection = self.connection
        new = connection.failed_attempts
        if self.outage == connection.opens:
            new -= self.outage_failures
        self.outage, self.outage_failures = connection.opens, connection.failed_attempts
        self.failed += new
        return self._within_retry()

    def _within_retry(self) -> bool:
        return self.retry is None or self.failed <= self.retry

    def _resend(self) -> None:
        delay = min(RESEND_DELAY * 2 ** (self.failed - 1), MAX_RESEND_DELAY)
        self.loop.call_later(delay, self.send)


class _ConnectionWaits:
    """The requests with a `retry` budget that wait for a connection (see `_Delivery`): each drop of the
    connection or failed attempt to make one counts against their budgets; past it, they fail, saying why
    there is no connection."""

    def __init__(self, connection: ClientConnection, offline: Offline) -> None:
        self.connection = connection
        self.offline = offline
        self._waiting: dict[_Delivery, None] = {}
        connection.on_lost.append(self._lost)
        # What waited is handed to the connection that opens: it fails or is resent as that connection's.
        connection.on_opened.append(self._waiting.clear)

    def add(self, delivery: _Delivery) -> bool:
        """Have `delivery` wait for a connection; False if it has failed instead."""
        if not delivery.count_outage():
            self._fail(delivery)
            return False
        self._waiting[delivery] = None
        return True

    def _lost(self, reason: str) -> None:
        for delivery in list(self._waiting):
            if delivery.done():
                del self._waiting[delivery]
            elif not delivery.count_outage():
                del self._waiting[delivery]
                self._fail(delivery)

    def _fail(self, delivery: _Delivery) -> None:
        attempts = "attempt" if delivery.failed == 1 else "attempts"
        delivery.caller.set_exception(
            MessageDeliveryFailure(
                f"{delivery.address}: {self.offline()} Given up after {delivery.failed} failed {attempts} "
                f"(retry={delivery.retry})."
            )
        )


class _PendingCall:
    """A call from its request's first send until its reply (or its error) ends `reply`. Its time-out is
    filed with the transport's `Deadlines`, as a cast's is."""

    __slots__ = (
        "_watch",
        "address",
        "deadlines",
        "granule",
        "heard",
        "monitor",
        "offline",
        "reply",
        "taken",
        "timeout",
    )

    def __init__(
        self,
        deadlines: Deadlines,
        offline: Offline,
        address: str,
        timeout: float,
        monitor: float | None,
        reply: asyncio.Future[Any],
    ) -> None:
        self.deadlines = deadlines
        self.offline = offline
        self.address = address
        self.timeout = timeout
        self.monitor = monitor  # call_monitor_timeout: fail once the server that took it is silent this long
        self.reply = reply
        self.taken = False  # the server accepted the request
        self.heard = 0.0  # when the server last showed it works on the call (took it, heartbeat): monotonic
        self._watch: asyncio.TimerHandle | None = None
        self.granule = deadlines.add(self, timeout)

    def on_taken(self) -> None:
        self.taken = True
        if self.monitor is not None:
            self.heard = time.monotonic()
            self._watch = self.reply.get_loop().call_later(self.monitor, self._check_heard)

    def expired(self) -> None:
        if not self.reply.done():
            stage = "no reply" if self.taken else "no server took the request"
            self.reply.set_exception(_late(self.address, stage, self.timeout, self.offline))

    def closed(self) -> None:
        if not self.reply.done():
            self.reply.set_exception(_closed(self.address))

    def _check_heard(self) -> None:
        assert self.monitor is not None
        silence = time.monotonic() - self.heard
        if silence < self.monitor:
            self._watch = self.reply.get_loop().call_later(self.monitor - silence, self._check_heard)
        elif not self.reply.done():
            self.reply.set_exception(
                MessagingTimeout(
                    f"{self.address}: the server stopped responding: no reply and no heartbeat for"
                    f" {self.monitor} s (call_monitor_timeout)"
                )
            )

    def stop(self) -> None:
        self.deadlines.discard(self, self.granule)
        if self._watch is not None:
            self._watch.cancel()


Offline = Callable[[], str | None]  # why a transport has no connection now, or None while it has one


def _closed(address: str) -> MessagingError:
    return MessagingError(f"{address}: the transport was closed before the request was taken")


def _late(address: str, what: str, timeout: float, offline: Offline) -> MessagingTimeout:
    """A time-out's error; while the transport has no connection, that is the likelier cause: it says so."""
    text = f"{address}: {what} within {timeout} s"
    why = offline()
    if why is not None:
        text += f"; {why}"
    return MessagingTimeout(text)


class _Cast:
    """A cast, from its first send until it is taken (or, pre-settled, written) or given up: the caller its
    `_Delivery` reports to (and a pre-settled one's outcome sink). A task awaits it; a thread's `_Waiter`
    or the backlog is its done-callback, called in the turn the cast ends: no future, and no loop turn
    between. Its time-out is filed with the transport's `Deadlines`, not a timer of its own. (Blocking
    casts at 16 threads: 5% less client CPU than a future and a timer each, bench/README.md.)"""

    __slots__ = (
        "_callback",
        "_future",
        "address",
        "deadlines",
        "ended",
        "error",
        "granule",
        "offline",
        "timeout",
    )

    def __init__(self, deadlines: Deadlines, offline: Offline, address: str, timeout: float) -> None:
        self.deadlines = deadlines
        self.offline = offline
        self.address = address
        self.timeout = timeout
        self.ended = False
        self.error: BaseException | None = None
        self._callback: Callable[[_Cast], object] | None = None
        self._future: asyncio.Future[None] | None = None
        self.granule = deadlines.add(self, timeout)

    @property
    def future(self) -> asyncio.Future[None]:
        """Done when the cast ends; cancelling it gives the cast up. Made when first asked for."""
        if self._future is None:
            self._future = self.deadlines.loop.create_future()
            if self.ended:
                self._settle(self._future)
        return self._future

    def __await__(self) -> Generator[Any, None, None]:
        return self.future.__await__()

    def add_done_callback(self, callback: Callable[[_Cast], object]) -> None:
        """Call `callback(cast)` when it ends (at once if it has). One callback at most."""
        if self.ended:
            callback(self)
        else:
            self._callback = callback

    def result(self) -> None:
        """Once ended: None if it was taken; else raises why it was given up."""
        if self.error is not None:
            raise self.error

    def done(self) -> bool:
        return self.ended or (self._future is not None and self._future.done())

    def taken(self) -> None:
        self._end(None)

    def set_result(self, outcome: Outcome) -> None:  # pre-settled: written, and so taken as far as we know
        self._end(None)

    def set_exception(self, error: BaseException) -> None:
        self._end(error)

    def expired(self) -> None:
        self._end(_late(self.address, "not taken", self.timeout, self.offline))

    def closed(self) -> None:
        self._end(_closed(self.address))

    def _end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.deadlines.discard(self, self.granule)
        if self._future is not None and not self._future.done():
            self._settle(self._future)
        # Dropped once called: with a waiter that holds the cast, it would make a cycle for the collector.
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(self)

    def _settle(self, future: asyncio.Future[None]) -> None:
        if self.error is None:
            future.set_result(None)
        else:
            future.set_exception(self.error)


class _Backlog:
    """The casts a transport sends in the background: posted at once, taken (or given up) later. Each one
    given up is logged; the first since the last `take_failure()` is kept for it."""

    __slots__ = (
        "_empty",
        "_posted",
        "_room",
        "deadlines",
        "dropped",
        "failed",
        "first_failure",
        "offline",
    )

    def __init__(self, deadlines: Deadlines, offline: Offline) -> None:
        self.deadlines = deadlines  # and, by them, the loop
        self.offline = offline
        self._posted: dict[_Cast, None] = {}  # in the order posted
        self.failed = 0
        self.first_failure: BaseException | None = None
        self.dropped = False  # closed with some left: their failures were counted once, in a summary
        self._room: asyncio.Future[None] | None = None
        self._empty: asyncio.Future[None] | None = None

    @property
    def count(self) -> int:
        return len(self._posted)

    def post(self, address: str, timeout: float) -> _Cast:
        posted = _Cast(self.deadlines, self.offline, address, timeout)
        self._posted[posted] = None
        posted.add_done_callback(self._ended)
        return posted

    def _ended(self, posted: _Cast) -> None:
        del self._posted[posted]
        error = posted.error
        if error is not None:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = error
            if not self.dropped:
                log.warning("a message sent in the background was not taken: %s", error)
        count = len(self._posted)
        # Posters wake once half the backlog is taken, not at each message: one wake for many.
        if self._room is not None and count <= BACKLOG_LIMIT // 2:
            _wake(self._room)
            self._room = None
        if self._empty is not None and not count:
            _wake(self._empty)
            self._empty = None

    def room(self) -> asyncio.Future[None]:
        """Done once the backlog has room for more (at once if it has)."""
        if self.count < BACKLOG_LIMIT:
            return self._done()
        if self._room is None or self._room.done():  # done: cancelled, by a poster that gave up
            self._room = self.deadlines.loop.create_future()
        return self._room

    def empty(self) -> asyncio.Future[None]:
        """Done once every message posted so far has been taken or given up."""
        if not self._posted:
            return self._done()
        if self._empty is None or self._empty.done():
            self._empty = self.deadlines.loop.create_future()
        return self._empty

    def take_failure(self) -> BaseException | None:
        """The first message given up since the last call (with how many others were, in a note)."""
        failure, failed = self.first_failure, self.failed
        self.first_failure, self.failed = None, 0
        if failure is not None and failed > 1:
            failure.add_note(f"({failed - 1} more sent in the background were not taken either)")
        return failure

    def _done(self) -> asyncio.Future[None]:
        done = self.deadlines.loop.create_future()
        done.set_result(None)
        return done


def _wake(waiters: asyncio.Future[None]) -> None:
    if not waiters.done():
        waiters.set_result(None)


class AsyncTransport:
    """A connection to the routers at `url`, on the running asyncio loop (see the module docstring).
    `to_primitive` writes what JSON cannot hold in the requests it encodes (serializer.to_primitive unless
    given: the oslo plugin gives oslo.serialization's, as oslo's own drivers use)."""

    def __init__(
        self,
        url: str = "meshbus://127.0.0.1:5672/",
        *,
        default_exchange: str | None = None,
        to_primitive: wire.ToPrimitive = to_primitive,
    ) -> None:
        parsed = TransportURL.parse(url)
        self.url = url
        self.default_exchange = default_exchange or wire.DEFAULT_EXCHANGE
        self.to_primitive = to_primitive  # for the requests it encodes (calls, casts)
        self.virtual_host = parsed.virtual_host
        self.loop = asyncio.get_running_loop()
        self.connection = ClientConnection(parsed.hosts, parsed.connection_options())
        self.connection.on_lost.append(self._connection_lost)
        self._calls: dict[str, _PendingCall] = {}
        # Message ids unique across processes and restarts without a uuid per call.
        self._id_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count()
        self._replies: Receiver | None = None
        self._deadlines = Deadlines(self.loop)
        self._backlog = _Backlog(self._deadlines, self._offline)
        self._waits = _ConnectionWaits(self.connection, self._offline)
        self._closed = False

    # -- addresses: of this transport's default exchange and virtual host ----------------------------------

    def rpc_address(self, target: Target) -> str:
        return wire.rpc_address(target, self.default_exchange, self.virtual_host)

    def server_addresses(self, target: Target) -> list[str]:
        return wire.server_addresses(target, self.default_exchange, self.virtual_host)

    def notify_address(self, target: Target, priority: str) -> str:
        return wire.notify_address(target, priority, self.default_exchange, self.virtual_host)

    def _offline(self) -> str | None:
        connection = self.connection
        if connection.connected:
            return None
        hosts = ", ".join(map(str, connection.hosts))
        why = connection.last_error or "connecting"
        return f"not connected to a router ({why}): is one running at {hosts}?"

    async def close(self) -> None:
        """Close the connection, once what was sent in the background has been taken (`CLOSE_LINGER`
        seconds at most: the rest is dropped, with a warning)."""
        backlog = self._backlog
        if backlog.count and not self._closed:
            try:
                async with asyncio.timeout(CLOSE_LINGER):
                    await backlog.empty()
            except TimeoutError:
                log.warning(
                    "closing with %d messages sent in the background not yet taken: they are dropped",
                    backlog.count,
                )
                backlog.dropped = True
        self._closed = True
        if self._replies is not None:
            self._replies.close()
        await self.connection.close()
        self._deadlines.close()  # what is still in flight: no outcome or reply can come now

    def _check_open(self) -> None:
        if self._closed:
            raise MessagingError("the transport is closed")

    # -- delivery: started on the loop, each returns the future its caller waits on ---------------------

    def start_call(
        self,
        address: str,
        request: dict[str, Any],
        context: dict[str, Any],
        *,
        timeout: float,
        retry: int | None,
        call_monitor_timeout: float | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """Send a request that expects a reply; the future of the reply's JSON body. It fails with
        `MessagingTimeout` after `timeout` seconds (or, with `call_monitor_timeout`, once the server that
        took the request has sent no heartbeat for that long), `MessageUndeliverable` at once when nobody
        serves `address`, and `OutcomeUnknown` when the connection drops after the server took the request.
        Cancelling it gives the call up."""
        self._check_open()
        message_id = f"{self._id_prefix}{next(self._ids)}"
        reply: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        pending = self._calls[message_id] = _PendingCall(
            self._deadlines, self._offline, address, timeout, call_monitor_timeout, reply
        )
        reply.add_done_callback(functools.partial(self._call_ended, message_id))

        def encode(when_ready: Callable[[], None]) -> bytes | None:
            reply_to = self._reply_address(when_ready)
            if reply_to is None:
                return None
            return wire.encode_request(
                address,
                request,
                context,
                message_id=message_id,
                reply_to=reply_to,
                ttl=timeout,
                call_monitor_timeout=call_monitor_timeout,
                default=self.to_primitive,
            )

        _Delivery(self._waits, address, encode, retry, reply, pending.on_taken).send()
        return reply

    def _call_ended(self, message_id: str, reply: asyncio.Future[dict[str, Any]]) -> None:
        self._calls.pop(message_id).stop()

    def start_cast(
        self, address: str, payload: bytes, *, at_least_once: bool, timeout: float, retry: int | None
    ) -> asyncio.Future[None]:
        """Send a request that expects no reply; a future done once it is taken (at least once: resent if it
        was given back) or, not `at_least_once`, written once, pre-settled; `MessagingTimeout` after
        `timeout` seconds. Cancelling it gives the cast up."""
        return self._start_cast(address, payload, at_least_once, timeout, retry).future

    def _start_request_cast(
        self,
        address: str,
        request: dict[str, Any],
        context: dict[str, Any],
        at_least_once: bool,
        timeout: float,
        retry: int | None,
    ) -> _Cast:
        payload = wire.encode_request(address, request, context, default=self.to_primitive)
        return self._start_cast(address, payload, at_least_once, timeout, retry)

    def _start_cast(
        self, address: str, payload: bytes, at_least_once: bool, timeout: float, retry: int | None
    ) -> _Cast:
        self._check_open()
        cast = _Cast(self._deadlines, self._offline, address, timeout)
        self._send_cast(cast, payload, at_least_once, retry)
        return cast

    def _send_cast(self, cast: _Cast, payload: bytes, at_least_once: bool, retry: int | None) -> None:
        if at_least_once:
            _Delivery(self._waits, cast.address, payload, retry, cast, cast.taken).send()
        else:
            self.connection.send(cast.address, payload, settled=True, outcome=cast)

    async def post(
        self, address: str, payload: bytes, *, at_least_once: bool, timeout: float, retry: int | None
    ) -> None:
        """Send a cast in the background: as `start_cast`, but nobody waits for it to be taken. One given up
        is logged, and raised by the next `flush()`. Returns at once, unless `BACKLOG_LIMIT` sent this way
        are not yet taken: then once half of them are."""
        if self._backlog.count >= BACKLOG_LIMIT:
            await self._backlog.room()
        self._post_now(address, payload, at_least_once, timeout, retry)

    def _post_now(
        self, address: str, payload: bytes, at_least_once: bool, timeout: float, retry: int | None
    ) -> None:
        self._check_open()
        self._send_cast(self._backlog.post(address, timeout), payload, at_least_once, retry)

    async def flush(self) -> None:
        """Wait until every cast sent in the background so far has been taken or given up, and raise the
        first given up since the last flush (a note says how many others were)."""
        await self._backlog.empty()
        failure = self._backlog.take_failure()
        if failure is not None:
            raise failure

    def reply(
        self, payload: bytes, *, at_least_once: bool = True, route: tuple[str, wire.MessageId] | None = None
    ) -> None:
        """Send a reply by its `to`, in the background: until its caller has it, resent with back-off while it
        is given back (a route through the mesh may be changing), at most REPLY_RESENDS times (its caller may
        be gone). `at_least_once=False`: written once, pre-settled (a call monitor's heartbeat). Given its
        `route` (its `to` and correlation id), a reply the router refuses (larger than it takes, say) is
        replaced by a failure that tells the caller why, who would otherwise wait for its time-out."""
        if not at_least_once:
            self.connection.send(None, payload, settled=True)
            return
        self._send_reply(payload, 0, route)

    # A reply's resends are callbacks, not a task: a task per reply is a server's dearest part of a call.
    def _send_reply(self, payload: bytes, attempt: int, route: tuple[str, wire.MessageId] | None) -> None:
        if self._closed:
            return
        sent = self.connection.send(None, payload)
        sent.add_done_callback(functools.partial(self._replied, payload, attempt, route))

    def _replied(
        self,
        payload: bytes,
        attempt: int,
        route: tuple[str, wire.MessageId] | None,
        sent: asyncio.Future[Outcome],
    ) -> None:
        error = sent.exception()
        if error is None:
            outcome = sent.result()
            if outcome.state == REJECTED:
                self._reply_refused(outcome, route)
            if outcome.state in (ACCEPTED, REJECTED):
                return
        elif not isinstance(error, OutcomeUnknown):
            return  # the connection is closed
        if attempt == REPLY_RESENDS:
            log.debug("a reply was given back %d times; its caller is gone", REPLY_RESENDS + 1)
            return
        delay = min(RESEND_DELAY * 2**attempt, MAX_RESEND_DELAY)
        asyncio.get_running_loop().call_later(delay, self._send_reply, payload, attempt + 1, route)

    def _reply_refused(self, outcome: Outcome, route: tuple[str, wire.MessageId] | None) -> None:
        why = f"the router refused the server's reply: it was {describe_outcome(outcome)}"
        if route is None:
            log.warning("%s", why)
            return
        log.warning("%s; its caller at %s is told", why, route[0])
        failure = wire.serialize_exception(MessageDeliveryFailure(why))
        self._send_reply(wire.encode_reply(*route, failure=failure), 0, None)

    # -- replies ------------------------------------------------------------------------------------------

    def _reply_address(self, when_ready: Callable[[], None]) -> str | None:
        """The reply link's address; None while it is not attached (the first call, a reconnect), and then
        `when_ready()` is called once it is."""
        replies = self._replies
        if replies is None:
            replies = self._replies = self.connection.receive(None, self._on_reply, credit=1000)
        address = replies.address
        if address is None:
            replies.when_ready(when_ready)
        return address

    def _on_reply(self, message: IncomingMessage) -> None:
        message.accept()
        try:
            correlation_id, body = wire.decode_reply(message.payload)
        except ValueError as error:
            log.warning("a reply that is not JSON was dropped: %s", error)
            return
        pending = self._calls.get(correlation_id or "")
        if pending is None or pending.reply.done():
            return
        if body is None:  # a heartbeat: the server still works on the call
            pending.heard = time.monotonic()
        else:
            pending.reply.set_result(body)

    def _connection_lost(self, reason: str) -> None:
        # The reply link dies with the connection: a call the server took will never see its reply.
        error = OutcomeUnknown(
            f"the connection dropped ({reason}) after a server took the call: it may or may not have run"
        )
        for pending in self._calls.values():
            if pending.taken and not pending.reply.done():
                pending.reply.set_exception(error)


def _detail(outcome: Outcome) -> str:
    return "" if outcome.state != MODIFIED else " (its consumer could not take it here)"


_wakeups = threading.local()  # each thread's green.Wakeup, for its blocking calls


def _forget_wakeups() -> None:
    # A forked child shares its parent's eventfds: a wake meant for the one could be read by the other.
    global _wakeups
    _wakeups = threading.local()


os.register_at_fork(after_in_child=_forget_wakeups)


class _Started(Protocol[T_co]):
    """What a blocking call waits for: a future, or a `_Cast`."""

    def add_done_callback(self, callback: Callable[[Any], object], /) -> None: ...

    def result(self) -> T_co: ...

    def __await__(self) -> Generator[Any, None, T_co]: ...


class _Waiter(Generic[T]):
    """A thread's wait for the loop, through the thread's own `green.Wakeup`: `ended` is the done-callback of
    what it waits for."""

    __slots__ = ("_ended", "_wakeup")

    def __init__(self) -> None:
        wakeup = getattr(_wakeups, "wakeup", None)
        if wakeup is None:
            wakeup = _wakeups.wakeup = green.Wakeup()
        self._wakeup: green.Wakeup = wakeup
        self._ended: _Started[T] | None = None

    def ended(self, started: _Started[T]) -> None:
        self._ended = started
        self._wakeup.wake()

    def wait(self) -> T:
        # A wait that was interrupted (KeyboardInterrupt) leaves a wake behind for the thread's next wait.
        while self._ended is None:
            self._wakeup.wait()
        return self._ended.result()


class Transport:
    """The blocking face of `AsyncTransport`: safe to use from any number of threads at once. Its I/O runs
    on an asyncio loop in a daemon thread it owns (uvloop where installed). In a process that eventlet has
    monkey-patched, that thread is still an OS thread and callers are green threads that wait without
    blocking the hub (see green.py)."""

    def __init__(
        self,
        url: str = "meshbus://127.0.0.1:5672/",
        *,
        default_exchange: str | None = None,
        to_primitive: wire.ToPrimitive = to_primitive,
    ) -> None:
        self.loop = _new_loop()
        self._green = green.active()
        # Why calls must fail at once (closed, or in a forked child), rather than wait for a loop that does
        # not run: None while the transport works.
        self._unusable: str | None = None
        self._pid = os.getpid()
        green.at_fork_in_child(self._forked)
        self._tasks: set[asyncio.Task[Any]] = set()
        # What other threads ask the loop to do, and how they wake it (see `call_soon_threadsafe`).
        self._inbox: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._inbox_wakeup = green.Wakeup(for_loop=True)
        self._inbox_woken = False
        self.loop.add_reader(self._inbox_wakeup.fd, self._take_inbox)
        self._thread = green.os_thread(self.loop.run_forever, "meshbus-io")
        self._thread.start()

        async def make() -> AsyncTransport:
            return AsyncTransport(url, default_exchange=default_exchange, to_primitive=to_primitive)

        self.aio = self.run(make())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the transport's loop and wait for its result (from any thread but that one)."""
        try:
            start: Callable[[], asyncio.Future[T]] = functools.partial(self._task, coroutine)
            return self.wait_for(start)
        except MessagingError:
            coroutine.close()  # not started as the transport is closed (a no-op if it ran and raised this)
            raise

    def wait_for(self, start: Callable[..., _Started[T]], *args: Any) -> T:
        """Call `start(*args)` on the transport's loop and wait for the result of the future (or `_Cast`) it
        returns (from any thread but the loop's). What needs no task of its own starts this way: a call, a
        cast."""
        if self._green:
            return green.run(self.call_soon_threadsafe, _awaiting(start, args))
        waiter: _Waiter[T] = _Waiter()  # not _Waiter[T](): a generic alias per call costs 1 us
        self.call_soon_threadsafe(self._start, start, args, waiter)
        return waiter.wait()

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        """Call `callback(*args)` on the transport's loop, from any thread (every blocking call comes through
        here). Not the loop's own call_soon_threadsafe: its wake-up write holds the GIL (see green.Wakeup).
        One wake for all that is queued until the loop looks. Raises `MessagingError` once closed."""
        if self._unusable is not None:
            raise MessagingError(self._unusable)
        item = (callback, args)
        self._inbox.append(item)
        if self._unusable is not None:  # closed meanwhile: its last turn may have looked already
            try:
                self._inbox.remove(item)
            except ValueError:  # it had not: the item runs there
                return
            raise MessagingError(self._unusable)
        if not self._inbox_woken:
            self._inbox_woken = True
            self._inbox_wakeup.wake()

    def cast(
        self,
        address: str,
        request: dict[str, Any],
        context: dict[str, Any],
        *,
        at_least_once: bool,
        timeout: float,
        retry: int | None,
    ) -> None:
        """`AsyncTransport.start_cast` of wire.py's body of `request` and `context`, from any thread: returns
        once the cast is taken (or written, not `at_least_once`), or raises why it was given up. Encoded on
        the I/O thread, as a call is: on the caller's, with 16 callers contending for the GIL, an oslo
        plugin's cast cost its client 4-5 us more (46 us; bench/README.md, session 14)."""
        self.wait_for(self.aio._start_request_cast, address, request, context, at_least_once, timeout, retry)

    def post(
        self, address: str, payload: bytes, *, at_least_once: bool, timeout: float, retry: int | None
    ) -> None:
        """`AsyncTransport.post` from any thread: returns once the cast is queued for the I/O thread."""
        # What the inbox holds counts too: the I/O thread may not have run it yet.
        if self.aio._backlog.count + len(self._inbox) >= BACKLOG_LIMIT:
            self.wait_for(self.aio._backlog.room)
        self.call_soon_threadsafe(self.aio._post_now, address, payload, at_least_once, timeout, retry)

    def flush(self) -> None:
        """`AsyncTransport.flush`, blocking."""
        self.run(self.aio.flush())

    def _take_inbox(self) -> None:
        self._inbox_wakeup.clear()
        # Cleared after the read, before the look: what is queued from now on wakes the loop again.
        self._inbox_woken = False
        # The callers' sends. Those of a long turn go out once they have waited `send_within`, as a task's
        # do: the router starts on the first while this thread writes the rest (blocking calls at 16 threads
        # +9-17%, bench/README.md, session 11).
        inbox = self._inbox
        while inbox:
            callback, args = inbox.popleft()
            try:
                callback(*args)
            except Exception:  # the rest of the inbox still runs
                log.exception("a callback handed to the I/O thread failed")

    def _start(self, start: Callable[..., _Started[T]], args: tuple[Any, ...], waiter: _Waiter[T]) -> None:
        started: _Started[T]
        try:
            started = start(*args)
        except Exception as error:  # raised before anything was sent (an invalid target...): the caller's
            failed: asyncio.Future[T] = self.loop.create_future()
            failed.set_exception(error)
            started = failed
        started.add_done_callback(waiter.ended)

    def _task(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        """Close the connection and stop the I/O thread; in a forked child, nothing: both are the
        parent's."""
        if not self._thread.is_alive():
            return
        self.run(self.aio.close())
        self._unusable = "the transport is closed"
        self.loop.call_soon_threadsafe(self._last_turn)
        self._thread.join()
        self.loop.remove_reader(self._inbox_wakeup.fd)
        self._inbox_wakeup.close()
        self.loop.close()

    def _last_turn(self) -> None:
        """On the loop, once closed: run what other threads queued before they could see it closed (each
        fails at once, as the transport is), then stop once the callbacks that tell them have run."""
        self._take_inbox()
        self.loop.call_soon(self.loop.call_soon, self.loop.stop)

    def _forked(self) -> None:
        self._unusable = (
            f"this transport was made in process {self._pid}, before it forked this one: its connection and "
            f"I/O thread stayed there. Make a new Transport in this process."
        )

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def take(
    message: IncomingMessage, what: str, decode: Callable[[bytes], wire.Incoming] = wire.decode_request
) -> wire.Incoming | None:
    """A request or notification, decoded; a message that is not one is rejected, and None returned."""
    try:
        return decode(message.payload)
    except ValueError as error:
        log.warning("a message that is not %s was rejected: %s", what, error)
        message.reject("amqp:decode-error", f"not {what}: {error}")
        return None


@dataclass(frozen=True, slots=True)
class Subscription:
    address: str
    handler: Callable[[IncomingMessage], None]
    credit: int
    pool: str | None = None


class AsyncService:
    """What RPC servers and notification listeners share: receivers on their addresses, work in progress,
    and the life cycle. `start()` attaches (all or none); `stop()` takes nothing more (the receivers are
    paused, so what is in work can still be acknowledged); `wait()` waits for the work, then detaches."""

    def __init__(self, transport: AsyncTransport, executor: concurrent.futures.Executor | None) -> None:
        self.transport = transport
        self.executor = executor  # for plain (not coroutine) endpoint methods; a thread pool if None
        self._receivers: list[Receiver] = []
        self._stopped: list[Receiver] = []
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        # Work for the executor, handed over once per turn of the loop; and the results of work done, taken
        # back by one call of the loop however many the workers add meanwhile (`_collecting`: that call is
        # on its way).
        self._for_workers: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
        self._from_workers: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._collecting = False
        self._working = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def subscriptions(self) -> list[Subscription]:
        raise NotImplementedError

    async def start(self) -> None:
        """Attach to every address; returns once the router has confirmed them all."""
        if self._receivers:
            return
        connection = self.transport.connection
        self._receivers = [
            connection.receive(s.address, s.handler, credit=s.credit, pool=s.pool)
            for s in self.subscriptions()
        ]
        try:
            await asyncio.gather(*(receiver.ready() for receiver in self._receivers))
        except BaseException:
            # A refused address: the others take nothing either, and start() may be retried.
            receivers, self._receivers = self._receivers, []
            for receiver in receivers:
                receiver.close()
            raise

    async def stop(self) -> None:
        """Take no more messages; those in work carry on (see `wait`)."""
        self._stopped += self._receivers
        self._receivers = []
        for receiver in self._stopped:
            receiver.pause()

    async def wait(self) -> None:
        """Wait until every message taken so far has been handled and acknowledged, then detach."""
        await self._idle.wait()
        stopped, self._stopped = self._stopped, []
        for receiver in stopped:
            receiver.close()

    def begin(self) -> None:
        """A message taken: work in progress until `end()`."""
        self._working += 1
        self._idle.clear()

    def end(self) -> None:
        self._working -= 1
        if not self._working:
            self._idle.set()

    def run(self, work: Coroutine[Any, Any, None]) -> None:
        """Handle a message in a task of its own, counted as work in progress."""
        self.begin()
        task = self.transport.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def run_in_worker(self, work: Callable[[], R], then: Callable[[R], None]) -> None:
        """Run plain `work` in the executor, counted as work in progress, then `then(its result)` on the
        loop: one hop each way, no task."""
        self.begin()
        # Handed to the executor on the next turn of the loop, with the rest of this turn's: after this turn's
        # output is written, so a request's acceptance is on its way before its endpoint runs. (The
        # transport's loop, not asyncio.get_running_loop(): on Python 3.11 that costs a getpid() system call.)
        if not self._for_workers:
            self.transport.loop.call_soon(self._start_workers)
        self._for_workers.append((work, then))

    def _start_workers(self) -> None:
        jobs, self._for_workers = self._for_workers, []
        if self.executor is None:
            # OS threads, as asyncio's default executor: even under eventlet this loop's thread has no hub.
            self.executor = green.Workers(DEFAULT_WORKERS, "meshbus-worker")
        # Workers.run takes a job without a future: the job hands its result to the loop itself.
        give = self.executor.run if isinstance(self.executor, green.Workers) else self.executor.submit
        for work, then in jobs:
            give(self._in_worker, work, then)

    def _in_worker(self, work: Callable[[], R], then: Callable[[R], None]) -> None:
        try:
            result = work()
        except Exception:
            log.exception("%s: a worker's job failed", type(self).__name__)
            self._from_workers.append((_ended, None))
        else:
            self._from_workers.append((then, result))
        if not self._collecting:
            self._collecting = True
            self.transport.loop.call_soon_threadsafe(self._after_workers)

    def _after_workers(self) -> None:
        # Cleared before the results are taken: a worker that adds one from now on calls again.
        self._collecting = False
        finished = self._from_workers
        while finished:
            then, result = finished.popleft()
            try:
                then(result)
            except Exception:
                log.exception("%s: handling a worker's result failed", type(self).__name__)
            finally:
                self.end()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.end()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: handling a message failed", type(self).__name__, exc_info=task.exception())


class BlockingService:
    """The blocking face of an asyncio server or listener (`aio`): `start()`, `stop()` and `wait()` block;
    its endpoints' plain (not coroutine) methods run in a pool of `max_workers` threads (green threads
    under eventlet)."""

    aio: AsyncService

    def __init__(self, transport: Transport, max_workers: int, thread_name: str) -> None:
        self.transport = transport
        self.executor = green.executor(max_workers, thread_name)

    def start(self) -> None:
        self.transport.run(self.aio.start())

    def stop(self) -> None:
        self.transport.run(self.aio.stop())

    def wait(self) -> None:
        self.transport.run(self.aio.wait())
        self.executor.shutdown(wait=True)


def _ended(result: None) -> None:
    """What follows a job that failed (and was logged): nothing but the end of its work."""


async def _awaiting(start: Callable[..., _Started[T]], args: tuple[Any, ...]) -> T:
    return await start(*args)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
