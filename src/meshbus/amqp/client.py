"""A client's connection to a router: encoded messages out and in over links, with fail-over.

Rules of this module:
1. It moves encoded messages (bytes) and outcomes. It knows nothing of RPC, JSON or oslo (messaging/ does).
2. It survives its socket: when the connection drops it reconnects across the host list with exponential
   back-off and jitter, re-attaches every receiver, and sends again what it had not yet written. A send
   written but not settled when the connection dropped fails with `OutcomeUnknown`: only the caller knows
   whether a duplicate is acceptable.
3. Everything runs on one asyncio loop; its methods must be called from that loop.
4. Sends go on a sender link per address (cached, closed after idle time: per-address flow control, no
   head-of-line blocking between destinations) while that link has credit, and otherwise on the
   connection's anonymous-relay link, where the router routes by `to` and RELEASES at once a message
   nobody consumes: the caller learns "nobody serves this" in a round trip instead of a time-out.
5. Output is written at the end of the loop's turn, all the turn made in one write; transfers in a long
   turn (many tasks sending), once they have waited `send_within`, so that the router works meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar, overload

from cproton_ffi import ffi, lib

from meshbus.amqp import pn
from meshbus.amqp.pn import CData

log = logging.getLogger("meshbus.client")

ACCEPTED: Final = "accepted"
REJECTED: Final = "rejected"
RELEASED: Final = "released"
MODIFIED: Final = "modified"
_OUTCOME_NAMES: Final = {
    lib.PN_ACCEPTED: ACCEPTED,
    lib.PN_REJECTED: REJECTED,
    lib.PN_RELEASED: RELEASED,
    lib.PN_MODIFIED: MODIFIED,
}
_CHUNK: Final = 65536  # bytes moved per call between proton and Python
SEND_WITHIN: Final = 100e-6  # seconds; the default of ClientConnection.send_within


class ClientError(Exception):
    """Base of the errors this module raises."""


class ConnectionClosed(ClientError):
    """The application closed the connection: the message was not sent."""


class OutcomeUnknown(ClientError):
    """The connection dropped after the message was written and before its outcome came back."""


class LinkRefused(ClientError):
    """The router refused or closed a link; the message says why."""


Condition = tuple[str, str]  # an AMQP error condition's name and description


@dataclass(frozen=True, slots=True)
class Host:
    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the consumer (or the router, for RELEASED when nobody consumes) did with a message."""

    state: str  # ACCEPTED, REJECTED, RELEASED or MODIFIED
    error: Condition | None = None  # a rejection's condition name and description
    delivery_failed: bool = False
    undeliverable_here: bool = False


SETTLED_OUTCOME: Final = Outcome(ACCEPTED)  # a pre-settled send's outcome as soon as it is written
# The outcomes that carry nothing but their state, made once: a frozen dataclass is slow to make.
_PLAIN_OUTCOMES: Final = {state: Outcome(state) for state in (ACCEPTED, RELEASED)}


@dataclass(slots=True)
class Options:
    container_id: str = field(default_factory=lambda: f"meshbus-{uuid.uuid4()}")
    # Advertised to the router, which then sends a frame at least every half of it; this end closes the
    # connection when nothing has arrived for this long. 4 s: a dead router is noticed within 5 s.
    idle_timeout: float = 4.0
    connect_timeout: float = 5.0
    reconnect_delay: float = 0.05  # first back-off; doubles per failed attempt, with jitter
    max_reconnect_delay: float = 5.0
    sender_idle_timeout: float = 600.0  # a per-address sender link unused this long is closed
    max_frame_size: int = 65536


class IncomingMessage:
    """A message a receiver got. Settle it exactly once: accept, release, reject or modify. Its receiver's
    credit is given back when it is settled, so credit bounds the messages a consumer holds; or, with
    `accept(hold_credit=True)`, when `finished()` is called: then credit bounds the messages in work."""

    __slots__ = ("_credit_held", "_delivery", "_generation", "_receiver", "payload")

    def __init__(self, receiver: Receiver, delivery: CData, payload: bytes) -> None:
        self._receiver = receiver
        self._delivery = delivery
        self._generation = receiver._conn._generation
        self._credit_held = False
        self.payload = payload

    def accept(self, *, hold_credit: bool = False) -> None:
        self._credit_held = hold_credit
        self._settle(lib.PN_ACCEPTED)

    def finished(self) -> None:
        """The work an `accept(hold_credit=True)` started is done: its credit goes back to the router."""
        if self._credit_held:
            self._credit_held = False
            if self._generation == self._receiver._conn._generation and self._receiver.link != ffi.NULL:
                self._receiver._settled()
                self._receiver._conn._flush_soon()

    def release(self) -> None:
        self._settle(lib.PN_RELEASED)

    def modify(self, *, delivery_failed: bool = True, undeliverable_here: bool = False) -> None:
        self._settle(lib.PN_MODIFIED, delivery_failed, undeliverable_here)

    def reject(self, name: str = "amqp:internal-error", description: str = "") -> None:
        self._settle(lib.PN_REJECTED, error=(name, description))

    def _settle(
        self,
        state: int,
        failed: bool = False,
        undeliverable: bool = False,
        error: Condition | None = None,
    ) -> None:
        delivery, self._delivery = self._delivery, ffi.NULL
        # After a reconnect, or once its receiver is closed, the router has released it back (or will):
        # nothing is left to settle, and the link may be freed.
        receiver = self._receiver
        if (
            delivery == ffi.NULL
            or self._generation != receiver._conn._generation
            or receiver.link == ffi.NULL
        ):
            return
        if state == lib.PN_MODIFIED:
            disposition = lib.pn_delivery_local(delivery)
            lib.pn_disposition_set_failed(disposition, failed)
            lib.pn_disposition_set_undeliverable(disposition, undeliverable)
        elif error is not None:
            pn.set_condition(lib.pn_disposition_condition(lib.pn_delivery_local(delivery)), *error)
        # A pre-settled delivery (the sender settled it) takes no outcome; its credit is still owed.
        if not lib.pn_delivery_settled(delivery):
            lib.pn_delivery_update(delivery, state)
        lib.pn_delivery_settle(delivery)
        if not self._credit_held:
            self._receiver._settled()
        self._receiver._conn._flush_soon()


Handler = Callable[[IncomingMessage], None]


class Receiver:
    """A subscription to an address (or a dynamic one), re-attached after every reconnect."""

    def __init__(
        self, conn: ClientConnection, address: str | None, handler: Handler, credit: int, pool: str | None
    ) -> None:
        self._conn = conn
        self.requested_address = address
        self.handler = handler
        self.credit = credit
        self.pool = pool
        self.link: CData = ffi.NULL
        self._owed = 0  # credit to give back once enough has been settled
        self._ready: asyncio.Future[str] = conn._loop.create_future()
        self.paused = False
        self.closed = False

    @property
    def address(self) -> str | None:
        """The address it receives from: for a dynamic receiver, the one the router assigned (it changes
        with every reconnect)."""
        return self._ready.result() if self._ready.done() and not self._ready.exception() else None

    async def ready(self) -> str:
        """Wait for the router to confirm the attach; the address it receives from."""
        return await asyncio.shield(self._ready)

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the router has confirmed the attach (or refused it: then `address` stays
        None and this raises the refusal)."""
        if self._ready.done():
            error = self._ready.exception()
            if error is not None:
                raise error
            callback()
        else:
            self._ready.add_done_callback(lambda _: callback())

    def pause(self) -> None:
        """Take no more messages: the router is asked to take back the credit (drain), and what arrives
        meanwhile is released at once. Messages already taken can still be settled until `close()`."""
        if self.paused:
            return
        self.paused = True
        if self.link != ffi.NULL:
            lib.pn_link_drain(self.link, 0)
            self._conn._flush()

    def close(self) -> None:
        """Detach: messages not yet settled go back to the router, which releases them."""
        if self.closed:
            return
        self.closed = True
        self._conn._receivers.discard(self)
        link, self.link = self.link, ffi.NULL
        if link != ffi.NULL:
            lib.pn_link_close(link)
            self._conn._flush()

    def _detached(self) -> None:
        """The connection dropped: a new attach (and, if dynamic, a new address) comes with the next one."""
        self.link = ffi.NULL
        self._owed = 0
        if self._ready.done():
            self._ready = self._conn._loop.create_future()

    def _attached(self, address: str) -> None:
        if self._ready.done():
            self._ready = self._conn._loop.create_future()
        self._ready.set_result(address)

    def _refused(self, error: LinkRefused) -> None:
        self.closed = True
        self.link = ffi.NULL
        self._conn._receivers.discard(self)
        if self._ready.done():
            self._ready = self._conn._loop.create_future()
        self._ready.set_exception(error)
        self._ready.exception()  # marked retrieved: nobody may be waiting; `ready()` still raises it

    def _settled(self) -> None:
        self._owed += 1
        if self._owed * 4 >= self.credit and self.link != ffi.NULL and not self.paused:
            lib.pn_link_flow(self.link, self._owed)
            self._owed = 0


class OutcomeSink(Protocol):
    """Where a send's outcome goes: an asyncio future, or an object of the caller's that takes it at once,
    in the turn the disposition arrives (a future hands it on only in a later turn, for a loop handle)."""

    def done(self) -> bool: ...

    def set_result(self, outcome: Outcome, /) -> None: ...

    def set_exception(self, error: BaseException, /) -> None: ...


S = TypeVar("S", bound=OutcomeSink)


@dataclass(slots=True)
class _Send:
    address: str | None
    payload: bytes
    settled: bool
    sink: OutcomeSink


@dataclass(slots=True)
class _Sender:
    link: CData
    last_used: float


class ClientConnection:
    """One AMQP connection to one of `hosts` at a time; see the module rules."""

    def __init__(self, hosts: list[Host], options: Options | None = None) -> None:
        if not hosts:
            raise ValueError("no host to connect to: give at least one host:port")
        self.hosts = hosts
        self.options = options or Options()
        self._loop = asyncio.get_running_loop()
        self._random = random.Random()
        self._receivers: set[Receiver] = set()
        self._queue: deque[_Send] = deque()  # not yet written
        self._in_flight: dict[CData, _Send] = {}  # written, outcome pending, by delivery
        self._senders: dict[str, _Sender] = {}  # per-address links
        self._links: dict[CData, Receiver | str | None] = {}  # link -> its receiver, or a sender's address
        self._tags = itertools.count()
        self._generation = 0  # one per connection made: stale deliveries are recognised by it
        self._socket: asyncio.Transport | None = None
        self._transport: CData = ffi.NULL
        self._connection: CData = ffi.NULL
        self._session: CData = ffi.NULL
        self._collector: CData = ffi.NULL
        self._relay: CData = ffi.NULL  # the anonymous-relay sender
        self._opened: asyncio.Event = asyncio.Event()
        self._lost: asyncio.Event = asyncio.Event()
        self._flush_scheduled = False
        self._output_since = 0.0  # perf_counter() when output began to wait for the end of the turn
        # In a long turn of the loop (many tasks sending), transfers are written once output has waited this
        # long (seconds), so that the router forwards them while the turn goes on: at 16 asyncio tasks
        # casting, 20% more casts/s; at 16 threads calling through the blocking face, 9-17% more calls/s.
        # None: at the end of the turn.
        self.send_within: float | None = SEND_WITHIN
        self._unframed = False  # transfers written since proton last made frames (see _write)
        self._out = ffi.new("char[]", _CHUNK)  # one buffer for every copy out of proton
        self._opened_waiter: asyncio.Future[None] = self._loop.create_future()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._closing = False
        self.connected_to: Host | None = None
        # Called with the reason when a connection drops or an attempt to make one fails; and once one opens.
        self.on_lost: list[Callable[[str], None]] = []
        self.on_opened: list[Callable[[], None]] = []
        self.last_error: str | None = None
        self.failed_attempts = 0  # connections dropped or not made since one was last open
        self.opens = 0  # connections made so far
        self._supervisor = self._loop.create_task(self._run(), name="meshbus-connection")

    # -- public -----------------------------------------------------------------------------------

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._opened.wait(), timeout)

    @property
    def connected(self) -> bool:
        return self._opened.is_set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop it runs on."""
        return self._loop

    @overload
    def send(
        self, address: str | None, payload: bytes, *, settled: bool = False
    ) -> asyncio.Future[Outcome]: ...

    @overload
    def send(self, address: str | None, payload: bytes, *, settled: bool = False, outcome: S) -> S: ...

    def send(
        self,
        address: str | None,
        payload: bytes,
        *,
        settled: bool = False,
        outcome: OutcomeSink | None = None,
    ) -> OutcomeSink:
        """Send an encoded message to `address` (None: by its `to`, on the anonymous-relay link). Its outcome
        goes to `outcome`, which is returned; without one, to a new future. (A sink whose `done()` turns
        true before the message is written gave it up: it is never written.)"""
        sink: OutcomeSink = self._loop.create_future() if outcome is None else outcome
        if self._closing:
            _tell(sink, ConnectionClosed("the connection is closed"))
            return sink
        item = _Send(address, payload, settled, sink)
        if self._queue or not self._write(item):
            self._queue.append(item)
        return sink

    def receive(
        self, address: str | None, handler: Handler, *, credit: int = 200, pool: str | None = None
    ) -> Receiver:
        """Receive from `address` (None: a dynamic address the router assigns, see `Receiver.ready`)."""
        receiver = Receiver(self, address, handler, credit, pool)
        self._receivers.add(receiver)
        if self._opened.is_set():
            self._attach_receiver(receiver)
            self._flush()
        return receiver

    async def close(self) -> None:
        """Close the connection with a Close frame; pending sends fail."""
        if self._closing:
            return
        self._closing = True
        self.last_error = "closed by the application"  # whichever end then closes the socket
        if self._connection != ffi.NULL and self._socket is not None:
            lib.pn_connection_close(self._connection)
            self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 1.0)
        self._supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor
        self._drop_connection("closed by the application")
        error = ConnectionClosed("the connection was closed before this message was sent")
        while self._queue:
            _tell(self._queue.popleft().sink, error)

    # -- connecting -------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, wait for the connection to drop, back off, connect to the next host; until closed."""
        delay = self.options.reconnect_delay
        for host in itertools.cycle(self.hosts):
            if self._closing:
                return
            try:
                await asyncio.wait_for(self._connect(host), self.options.connect_timeout)
            except (OSError, TimeoutError, ClientError) as error:
                self.last_error = f"{host}: {error or type(error).__name__}"
                log.warning("cannot connect to %s (%s); next attempt in %.2f s", host, error, delay)
                self._drop_connection(str(error))
                await asyncio.sleep(delay * (0.5 + self._random.random()))
                delay = min(delay * 2, self.options.max_reconnect_delay)
                continue
            delay = self.options.reconnect_delay
            await self._lost.wait()
            if self._closing:
                return
            log.warning("connection to %s lost: %s; reconnecting", host, self.last_error)

    async def _connect(self, host: Host) -> None:
        self._lost.clear()
        self.last_error = None  # the first reason this connection fails for is the one reported
        self._generation += 1
        self._transport = lib.pn_transport()
        self._connection = lib.pn_connection()
        self._collector = lib.pn_collector()
        lib.pn_connection_collect(self._connection, self._collector)
        lib.pn_connection_set_container(self._connection, self.options.container_id.encode())
        lib.pn_connection_set_hostname(self._connection, host.host.encode())
        lib.pn_transport_set_idle_timeout(self._transport, int(self.options.idle_timeout * 1000))
        lib.pn_transport_set_max_frame(self._transport, self.options.max_frame_size)
        sasl = lib.pn_sasl(self._transport)
        if host.user is not None:
            lib.pn_connection_set_user(self._connection, host.user.encode())
            lib.pn_connection_set_password(self._connection, (host.password or "").encode())
            lib.pn_sasl_set_allow_insecure_mechs(sasl, True)
            lib.pn_sasl_allowed_mechs(sasl, b"PLAIN")
        else:
            lib.pn_sasl_allowed_mechs(sasl, b"ANONYMOUS")
        lib.pn_transport_bind(self._transport, self._connection)
        lib.pn_connection_open(self._connection)
        self._session = lib.pn_session(self._connection)
        lib.pn_session_open(self._session)
        self._relay = lib.pn_sender(self._session, b"meshbus-relay")
        lib.pn_link_set_snd_settle_mode(self._relay, lib.PN_SND_MIXED)
        lib.pn_link_open(self._relay)
        self._links[self._relay] = None
        opened = self._opened_waiter = self._loop.create_future()
        await self._loop.create_connection(lambda: _Protocol(self), host.host, host.port)
        await opened
        self.connected_to = host
        log.info("connected to %s", host)
        for receiver in list(self._receivers):
            self._attach_receiver(receiver)
        self.failed_attempts = 0
        self.opens += 1
        self._opened.set()
        self._drain_queue()
        self._flush()
        for callback in self.on_opened:
            callback()

    def _drop_connection(self, reason: str) -> None:
        """Forget the current connection's engine objects; fail what was in flight on it. Once per connection
        or attempt: a socket lost while connecting is dropped there, then again by the attempt's failure."""
        if self._connection == ffi.NULL:
            return
        if not self._closing:  # counted before anything is told: a resend may count it (messaging/)
            self.failed_attempts += 1
        self._opened.clear()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._socket is not None:
            self._socket.abort()
            self._socket = None
        in_flight, self._in_flight = self._in_flight, {}
        unknown = OutcomeUnknown(f"the connection dropped ({reason}) before the message's outcome came back")
        for item in in_flight.values():
            _tell(item.sink, unknown)
        self._senders.clear()
        self._links.clear()
        for receiver in self._receivers:
            receiver._detached()
        lib.pn_transport_unbind(self._transport)
        lib.pn_connection_release(self._connection)
        lib.pn_decref(self._connection)  # pn_connection()'s own reference: release alone leaves it allocated
        lib.pn_decref(self._transport)
        lib.pn_collector_free(self._collector)
        self._connection = self._transport = self._collector = ffi.NULL
        self._session = self._relay = ffi.NULL
        self._lost.set()
        for callback in self.on_lost:
            callback(reason)

    # -- sockets ----------------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self._unframed:  # before the input, which may take back the credit they were written on
            self._unframed = False
            lib.pn_transport_pending(self._transport)
        view = memoryview(data)
        while view:
            capacity = lib.pn_transport_capacity(self._transport)
            if capacity < 0:
                break
            chunk = view[:capacity]
            lib.pn_transport_push(self._transport, ffi.from_buffer(chunk), len(chunk))
            view = view[capacity:]
            self._process()
        # Input re-arms proton's idle time-out only when the transport is ticked: without this tick, a silent
        # router would be noticed only at the tick after next, up to twice the time-out.
        lib.pn_transport_tick(self._transport, int(time.monotonic() * 1000))
        self._flush()

    def _socket_lost(self, error: Exception | None) -> None:
        if self._socket is None:
            return
        self._socket = None
        if not self.last_error:  # else this end closed it, for that reason (an idle time-out, a Close)
            self.last_error = str(error) if error else "the router closed the socket"
        self._fail_open(ClientError(self.last_error))
        self._drop_connection(self.last_error)

    def _fail_open(self, error: Exception) -> None:
        waiter = self._opened_waiter
        if not waiter.done():
            waiter.set_exception(error)
            # Marked retrieved: its connect attempt may be gone (timed out, the connection closed), and the
            # error would be logged as never retrieved when the future is collected.
            waiter.exception()

    def _flush_soon(self, within: float | None = None) -> None:
        """Write the output at the end of this turn of the loop, with all the turn adds to it; or, given
        `within`, as soon as output has waited that long in a long turn (see `send_within`)."""
        if self._flush_scheduled:
            if within is not None:
                now = time.perf_counter()
                if now - self._output_since >= within:
                    self._output_since = now
                    self._flush()
            return
        self._flush_scheduled = True
        self._output_since = time.perf_counter()
        self._loop.call_soon(self._flush_at_end_of_turn)

    def _flush_at_end_of_turn(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        socket, transport = self._socket, self._transport
        if socket is None or transport == ffi.NULL:
            return
        self._unframed = False  # framed by the pn_transport_pending below
        buffer = self._out
        while True:
            pending = lib.pn_transport_pending(transport)
            if pending <= 0:
                if pending < 0 and not socket.is_closing():
                    socket.close()  # proton wrote its last frame (Close): the connection is done
                break
            size = min(pending, _CHUNK)
            lib.pn_transport_peek(transport, buffer, size)
            socket.write(ffi.buffer(buffer, size)[:])
            lib.pn_transport_pop(transport, size)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self._tick_handle is not None or self._transport == ffi.NULL:
            return
        deadline = lib.pn_transport_tick(self._transport, int(time.monotonic() * 1000))
        if deadline:
            self._tick_handle = self._loop.call_at(deadline / 1000, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        if self._transport == ffi.NULL:
            return
        lib.pn_transport_tick(self._transport, int(time.monotonic() * 1000))
        self._sweep_senders()
        self._process()
        self._flush()

    # -- events -----------------------------------------------------------------------------------

    def _process(self) -> None:
        collector = self._collector
        while True:
            event = lib.pn_collector_peek(collector)
            if event == ffi.NULL:
                return
            kind = lib.pn_event_type(event)
            if kind == lib.PN_DELIVERY:
                self._on_delivery(lib.pn_event_delivery(event))
            elif kind == lib.PN_LINK_FLOW:
                self._drain_queue()
                link = lib.pn_event_link(event)
                # The router takes back a sender's credit (drain) when its address loses its last
                # consumer: what is not sent now goes by the anonymous-relay link, which says at once
                # whether anyone consumes it.
                if lib.pn_link_is_sender(link) and lib.pn_link_get_drain(link):
                    lib.pn_link_drained(link)
            elif kind == lib.PN_CONNECTION_REMOTE_OPEN:
                waiter = self._opened_waiter
                if not waiter.done():
                    waiter.set_result(None)
            elif kind == lib.PN_LINK_REMOTE_OPEN:
                self._on_link_open(lib.pn_event_link(event))
            elif kind in (lib.PN_LINK_REMOTE_CLOSE, lib.PN_LINK_REMOTE_DETACH):
                self._on_link_close(lib.pn_event_link(event))
            elif kind == lib.PN_CONNECTION_REMOTE_CLOSE:
                error = pn.condition(lib.pn_connection_remote_condition(lib.pn_event_connection(event)))
                self.last_error = f"the router closed the connection: {_describe(error)}"
                lib.pn_connection_close(lib.pn_event_connection(event))
            elif kind in (lib.PN_TRANSPORT_ERROR, lib.PN_TRANSPORT_CLOSED):
                error = pn.condition(lib.pn_transport_condition(lib.pn_event_transport(event)))
                if error is not None and not self.last_error:
                    self.last_error = _describe(error)
                self._fail_open(ClientError(self.last_error or "transport closed"))
            lib.pn_collector_pop(collector)

    def _on_link_open(self, link: CData) -> None:
        owner = self._links.get(link)
        if isinstance(owner, Receiver):
            address = pn.terminus_address(lib.pn_link_remote_source(link))
            if address is None:  # the router refuses by attaching with no source, then detaching
                return
            owner._attached(address)

    def _on_link_close(self, link: CData) -> None:
        owner = self._links.pop(link, None)
        error = pn.condition(lib.pn_link_remote_condition(link))
        if isinstance(owner, Receiver):
            if not owner.closed:
                where = owner.requested_address or "a dynamic address"
                owner._refused(
                    LinkRefused(f"the router refused the receiver for {where}: {_describe(error)}")
                )
        elif owner is not None:
            self._senders.pop(owner, None)
        elif link == self._relay:
            self.last_error = f"the router closed the anonymous-relay link: {_describe(error)}"
            lib.pn_connection_close(self._connection)
        lib.pn_link_close(link)
        for delivery, item in list(self._in_flight.items()):
            if lib.pn_delivery_link(delivery) == link:
                del self._in_flight[delivery]
                _tell(item.sink, OutcomeUnknown(f"the link to {item.address} closed: {_describe(error)}"))
        lib.pn_link_free(link)

    def _on_delivery(self, delivery: CData) -> None:
        # A send's outcome is known by its send, without asking proton for the link (two cffi calls fewer).
        item = self._in_flight.get(delivery)
        link = ffi.NULL if item is not None else lib.pn_delivery_link(delivery)
        if item is not None or lib.pn_link_is_sender(link):
            if not lib.pn_delivery_updated(delivery) and not lib.pn_delivery_settled(delivery):
                return
            self._in_flight.pop(delivery, None)
            lib.pn_delivery_settle(delivery)
            if item is not None:
                _tell(item.sink, _read_outcome(delivery))
            return
        owner = self._links.get(link)
        if lib.pn_delivery_aborted(delivery):
            # Given up mid-way (the router refused it as too large, or its producer aborted it): nothing to
            # hand on. Settled as proton asks; the credit it took is given back.
            lib.pn_delivery_settle(delivery)
            if isinstance(owner, Receiver):
                owner._settled()
            return
        if lib.pn_delivery_partial(delivery) or not lib.pn_delivery_readable(delivery):
            return
        payload = _read(link, delivery, self._out)
        lib.pn_link_advance(link)
        if not isinstance(owner, Receiver) or owner.closed or owner.paused:
            lib.pn_delivery_update(delivery, lib.PN_RELEASED)
            lib.pn_delivery_settle(delivery)
            return
        message = IncomingMessage(owner, delivery, payload)
        try:
            owner.handler(message)
        except Exception:
            log.exception("receiver for %s: its handler failed; the message is released", owner.address)
            message.release()

    # -- links and sends --------------------------------------------------------------------------

    def _attach_receiver(self, receiver: Receiver) -> None:
        link = lib.pn_receiver(self._session, f"meshbus-rx-{next(self._tags)}".encode())
        source = lib.pn_link_source(link)
        if receiver.requested_address is None:
            lib.pn_terminus_set_dynamic(source, True)
        else:
            lib.pn_terminus_set_address(source, receiver.requested_address.encode())
        if receiver.pool is not None:
            properties = lib.pn_link_properties(link)
            lib.pn_data_put_map(properties)
            lib.pn_data_enter(properties)
            pn.put_symbol(properties, pn.POOL_PROPERTY)
            pn.put_string(properties, receiver.pool)
            lib.pn_data_exit(properties)
        lib.pn_link_set_rcv_settle_mode(link, lib.PN_RCV_FIRST)
        lib.pn_link_open(link)
        if not receiver.paused:
            lib.pn_link_flow(link, receiver.credit)
        receiver.link = link
        self._links[link] = receiver

    def _sender_for(self, address: str) -> CData:
        """The cached sender link to `address`, attached now if there is none."""
        sender = self._senders.get(address)
        now = time.monotonic()
        if sender is None:
            link = lib.pn_sender(self._session, f"meshbus-tx-{next(self._tags)}".encode())
            lib.pn_terminus_set_address(lib.pn_link_target(link), address.encode())
            lib.pn_link_set_snd_settle_mode(link, lib.PN_SND_MIXED)
            lib.pn_link_open(link)
            self._links[link] = address
            sender = self._senders[address] = _Sender(link, now)
            self._flush_soon()
        sender.last_used = now
        return sender.link

    def _sweep_senders(self) -> None:
        idle_since = time.monotonic() - self.options.sender_idle_timeout
        for address, sender in list(self._senders.items()):
            if sender.last_used < idle_since and not lib.pn_link_unsettled(sender.link):
                del self._senders[address]
                lib.pn_link_close(sender.link)

    def _write(self, item: _Send) -> bool:
        """Write `item` on a link with credit; False if none has any (or there is no connection)."""
        if not self._opened.is_set():
            return False
        link = ffi.NULL
        if item.address is not None:
            link = self._sender_for(item.address)
            if lib.pn_link_credit(link) <= 0:
                link = ffi.NULL
        if link == ffi.NULL:
            if lib.pn_link_credit(self._relay) <= 0:
                return False
            link = self._relay
        tag = next(self._tags).to_bytes(8, "little")
        delivery = lib.pn_delivery(link, pn.pn_bytes(tag))
        lib.pn_link_send(link, ffi.from_buffer(item.payload), len(item.payload))
        lib.pn_link_advance(link)
        if item.settled:
            lib.pn_delivery_settle(delivery)
            _tell(item.sink, SETTLED_OUTCOME)
        else:
            self._in_flight[delivery] = item
        # Proton frames a transfer only when asked for output, and only while the link still has credit. The
        # router may take back a per-address link's credit (its last consumer left) in input read before the
        # next flush: the transfer, not framed yet, would then stay in proton for good, with no outcome ever.
        # So the transfers written are framed, spending the credit they were written on, before any input
        # (`_received`): once for all of them. Their bytes go out with the next flush.
        self._unframed = True
        self._flush_soon(self.send_within)
        return True

    def _drain_queue(self) -> None:
        queue = self._queue
        while queue:
            # A send whose caller gave up (time-out, cancel) is never written.
            if queue[0].sink.done() or self._write(queue[0]):
                queue.popleft()
            else:
                return


class _Protocol(asyncio.Protocol):
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn._socket = transport  # type: ignore[assignment]  # a stream transport
        self.conn._flush()

    def data_received(self, data: bytes) -> None:
        self.conn._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._socket_lost(exc)


def _read(link: CData, delivery: CData, buffer: CData) -> bytes:
    """A complete delivery's bytes."""
    size = lib.pn_delivery_pending(delivery)
    if size <= _CHUNK:  # the usual case: one copy
        got = lib.pn_link_recv(link, buffer, size)
        return ffi.buffer(buffer, got)[:] if got > 0 else b""
    pieces: list[bytes] = []
    while True:
        got = lib.pn_link_recv(link, buffer, _CHUNK)
        if got <= 0:
            return b"".join(pieces)
        pieces.append(ffi.buffer(buffer, got)[:])


def _tell(sink: OutcomeSink, outcome: Outcome | BaseException) -> None:
    """Hand a send's outcome to its sink, unless it gave the send up. A sink that raises is logged: the
    connection's other deliveries carry on."""
    if sink.done():
        return
    try:
        if isinstance(outcome, BaseException):
            sink.set_exception(outcome)
        else:
            sink.set_result(outcome)
    except Exception:
        log.exception("a send's outcome could not be handed over")


def _read_outcome(delivery: CData) -> Outcome:
    state = _OUTCOME_NAMES.get(lib.pn_delivery_remote_state(delivery), RELEASED)
    if state == REJECTED:
        remote = lib.pn_delivery_remote(delivery)
        return Outcome(state, error=pn.condition(lib.pn_disposition_condition(remote)))
    if state == MODIFIED:
        remote = lib.pn_delivery_remote(delivery)
        return Outcome(
            state,
            delivery_failed=bool(lib.pn_disposition_is_failed(remote)),
            undeliverable_here=bool(lib.pn_disposition_is_undeliverable(remote)),
        )
    return _PLAIN_OUTCOMES[state]


def _describe(error: Condition | None) -> str:
    if error is None:
        return "no reason given"
    name, description = error
    return f"{name}: {description}" if description else name


def describe_outcome(outcome: Outcome) -> str:
    """An outcome as an error message's words."""
    if outcome.state == REJECTED:
        return f"rejected ({_describe(outcome.error)})"
    return outcome.state
