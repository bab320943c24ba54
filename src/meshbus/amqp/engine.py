"""The protocol edge of the router: proton events in, core events out; core actions in, proton calls out.

Rules of this module:
1. It translates; it decides nothing about routing, credit or outcomes (router/core.py does).
2. One collector serves every connection (cheaper than one each). Events are handled in order; after each
   batch of input, the output of every connection it touched is written at once, in one write each.
3. The hot path (transfers, dispositions, flow) calls proton's cffi `lib` directly, with no proton Python
   wrapper objects; encoded messages are forwarded as received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from os import sched_yield
from typing import TYPE_CHECKING, Final

from cproton_ffi import ffi

from meshbus import PRODUCT, __version__
from meshbus.amqp import pn
from meshbus.amqp.annotations import AnnotationError, stamp, take
from meshbus.amqp.connection import WRITE_HIGH_WATER, AmqpConnection
from meshbus.amqp.peek import Scan, peek
from meshbus.amqp.pn import (
    PN_CONNECTION_REMOTE_CLOSE,
    PN_CONNECTION_REMOTE_OPEN,
    PN_DELIVERY,
    PN_LINK_FLOW,
    PN_LINK_REMOTE_CLOSE,
    PN_LINK_REMOTE_DETACH,
    PN_LINK_REMOTE_OPEN,
    PN_SESSION_REMOTE_CLOSE,
    PN_SESSION_REMOTE_OPEN,
    PN_SND_SETTLED,
    PN_TRANSPORT_CLOSED,
    PN_TRANSPORT_ERROR,
    POOL_PROPERTY,
    ROLE_PROPERTY,
    CData,
    pn_collector,
    pn_collector_peek,
    pn_collector_pop,
    pn_connection,
    pn_connection_close,
    pn_connection_collect,
    pn_connection_condition,
    pn_connection_offered_capabilities,
    pn_connection_open,
    pn_connection_properties,
    pn_connection_release,
    pn_connection_remote_condition,
    pn_connection_remote_container,
    pn_connection_set_container,
    pn_decref,
    pn_delivery,
    pn_delivery_abort,
    pn_delivery_aborted,
    pn_delivery_link,
    pn_delivery_local,
    pn_delivery_partial,
    pn_delivery_pending,
    pn_delivery_remote,
    pn_delivery_remote_state,
    pn_delivery_settle,
    pn_delivery_settled,
    pn_delivery_update,
    pn_disposition_condition,
    pn_disposition_is_failed,
    pn_disposition_is_undeliverable,
    pn_disposition_set_failed,
    pn_disposition_set_undeliverable,
    pn_event_connection,
    pn_event_delivery,
    pn_event_link,
    pn_event_session,
    pn_event_transport,
    pn_event_type,
    pn_link_advance,
    pn_link_close,
    pn_link_condition,
    pn_link_credit,
    pn_link_drained,
    pn_link_flow,
    pn_link_free,
    pn_link_get_drain,
    pn_link_is_sender,
    pn_link_open,
    pn_link_properties,
    pn_link_recv,
    pn_link_remote_properties,
    pn_link_remote_rcv_settle_mode,
    pn_link_remote_snd_settle_mode,
    pn_link_remote_source,
    pn_link_remote_target,
    pn_link_send,
    pn_link_session,
    pn_link_set_max_message_size,
    pn_link_set_rcv_settle_mode,
    pn_link_set_snd_settle_mode,
    pn_link_source,
    pn_link_target,
    pn_session_close,
    pn_session_connection,
    pn_session_open,
    pn_terminus_copy,
    pn_terminus_is_dynamic,
    pn_terminus_set_address,
    pn_transport_close_head,
    pn_transport_close_tail,
    pn_transport_condition,
    pn_transport_connection,
    pn_transport_peek,
    pn_transport_pending,
    pn_transport_pop,
    pn_transport_tick,
    pn_transport_unbind,
)
from meshbus.config import ListenerConfig
from meshbus.router.addressing import DistributionRules, QueueRules
from meshbus.router.core import (
    ACCEPTED_KIND,
    MODIFIED_KIND,
    REJECTED_KIND,
    RELEASED_KIND,
    AttachError,
    ConsumerLink,
    Delivery,
    Outcome,
    ProducerLink,
    RouterCore,
    rejected,
)
from meshbus.users import UserDatabase

if TYPE_CHECKING:
    from meshbus.amqp.broker import BrokerHost
    from meshbus.amqp.interrouter import MeshEdge

# Final names: compiled (mypyc) code reads them from C statics, not from a dictionary per call.
unpack: Final = ffi.unpack
from_buffer: Final = ffi.from_buffer
epoch_seconds: Final = time.time  # message expiry times are wall-clock times

log = logging.getLogger("meshbus.router")

_OUTCOMES: Final = {ACCEPTED_KIND: Outcome(ACCEPTED_KIND), RELEASED_KIND: Outcome(RELEASED_KIND)}
MALFORMED: Final = rejected(
    "amqp:decode-error", "the message's header or properties section is not valid AMQP"
)
MAX_HEADERS: Final = 1 << 20  # bytes a message may take before its properties section is complete
_BUFFER_SIZE: Final = 1 << 16


class _Stream:
    """A multi-frame delivery still arriving: its size so far and the consumers' deliveries it feeds."""

    __slots__ = ("buffer", "delivery", "outputs", "received", "refusal")

    def __init__(self, received: int, buffer: bytearray | None = None) -> None:
        self.delivery: Delivery | None = None  # None until the headers have arrived and it is routed
        self.buffer = buffer  # the frames received before it could be routed
        self.outputs: list[tuple[ConsumerLink, CData]] = []
        self.received = received
        self.refusal: Outcome | None = None  # refused: the rest is read and discarded, then this outcome


class Engine:
    """Drives every connection's proton engine and implements the core's `Edge` protocol."""

    def __init__(
        self,
        router_id: str,
        rules: DistributionRules,
        users: UserDatabase | None,
        executor: Executor | None = None,
        busy_poll: float = 0.0,
        queues: QueueRules | None = None,
    ) -> None:
        self.router_id = router_id
        self.collector = pn_collector()
        self.core = RouterCore(self, rules, router_id, f"{time.time_ns():x}", queues)
        self.users = users
        self.executor = executor
        self.mesh: MeshEdge | None = None  # set when the router has inter-router listeners or connectors
        self.broker: BrokerHost | None = None  # the links to brokers (outgoing connections not to routers)
        self.connections: set[AmqpConnection] = set()
        self.by_connection: dict[CData, AmqpConnection] = {}
        self.links: dict[CData, ProducerLink | ConsumerLink] = {}
        self.streams: dict[CData, _Stream] = {}
        self._dirty: set[AmqpConnection] = set()
        self._settle_later: list[tuple[ConsumerLink, CData]] = []
        self._flush_scheduled = False
        self._busy_poll = busy_poll  # seconds
        # Work to finish before output is written, so that its own output leaves with the input's that
        # caused it (the embedded store's pending turn: a stored message's delivery, a producer accepted).
        self.before_flush: list[Callable[[], None]] = []
        self._polling_until = 0.0  # perf_counter() time; 0: not polling
        self._last_burst = 0.0  # perf_counter() time of the last burst of input
        self._mean_gap = 1.0  # seconds between bursts, a moving average
        self._buffer = ffi.new("char[]", _BUFFER_SIZE)  # shared by every read and write: one thread
        self._tag = ffi.new("uint64_t[1]")
        self._tag_bytes = (8, ffi.cast("char *", self._tag))  # a pn_bytes_t over the counter
        # Proton's reports of a connection go to `proton_says` (kept: a cffi callback must outlive its use).
        self.proton_tracer: CData = ffi.callback("pn_tracer_t", self.proton_says)
        self._handlers: dict[int, Callable[[CData], None]] = {
            PN_CONNECTION_REMOTE_OPEN: self._on_connection_open,
            PN_CONNECTION_REMOTE_CLOSE: self._on_connection_close,
            PN_SESSION_REMOTE_OPEN: self._on_session_open,
            PN_SESSION_REMOTE_CLOSE: self._on_session_close,
            PN_LINK_REMOTE_OPEN: self._on_link_open,
            PN_LINK_REMOTE_CLOSE: self._on_link_close,
            PN_LINK_REMOTE_DETACH: self._on_link_close,
            PN_LINK_FLOW: self._on_flow,
            PN_TRANSPORT_ERROR: self._on_transport_error,
            PN_TRANSPORT_CLOSED: self._on_transport_closed,
        }

    # -- connections ---------------------------------------------------------------------------------

    def new_connection(self, conn: AmqpConnection) -> CData:
        connection = pn_connection()
        pn_connection_collect(connection, self.collector)
        pn_connection_set_container(connection, self.router_id.encode())
        properties = {"product": PRODUCT, "version": __version__}
        if conn.inter_router:  # so that a router connecting to the wrong port (or a client) is told
            properties[ROLE_PROPERTY] = "inter-router"
        pn.put_symbol_map(pn_connection_properties(connection), properties)
        pn.put_symbol_array(pn_connection_offered_capabilities(connection), ["ANONYMOUS-RELAY"])
        self.by_connection[connection] = conn
        return connection

    def proton_says(self, transport: CData, message: CData) -> None:
        """What proton reports of a connection (its warnings and errors; with PN_TRACE_FRM=1, every frame):
        into the router's log, with the peer, rather than onto stderr. After a "process error" proton makes no
        more output for the connection (its peer asked for what proton cannot do, such as more links than its
        begin allows): the connection is dropped, with proton's report before the error as the reason."""
        conn = self.by_connection.get(pn_transport_connection(transport))
        text = ffi.string(message).decode(errors="replace")
        log.warning("proton: peer=%s %s", "?" if conn is None else conn.peer, text)
        if conn is None:
            return
        if "process error" in text:
            self.abort(conn, "amqp:internal-error", conn.proton_said or text)
        else:
            conn.proton_said = text

    def open_outgoing(self, conn: AmqpConnection) -> None:
        """A connection this router made: it speaks first."""
        pn_connection_open(conn.connection)
        self.mark(conn)

    def mechanisms(self, listener: ListenerConfig) -> list[str]:
        """The listener's SASL mechanisms that can succeed: PLAIN only with a users file, and no ANONYMOUS
        where the listener must authenticate its peers."""
        usable = {"PLAIN": self.users is not None, "ANONYMOUS": not listener.authenticate_peer}
        return [m for m in listener.sasl_mechanisms if usable[m]]

    def verify_password(self, user: str, password: str) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        if self.users is None:
            future: asyncio.Future[bool] = loop.create_future()
            future.set_result(False)
            return future
        return loop.run_in_executor(self.executor, self.users.verify, user, password)

    def mark(self, conn: AmqpConnection) -> None:
        """The connection may have output: write it after the input being handled, or at the latest at
        the end of this turn of the event loop."""
        self._dirty.add(conn)
        if not self._flush_scheduled:  # one call per loop turn, however many batches of input it has
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_at_end_of_turn)

    def _flush_at_end_of_turn(self) -> None:
        self._flush_scheduled = False
        self.flush_touched()

    def keep_polling(self) -> None:
        """After a burst of input: keep the event loop polling, not sleeping, for `busy_poll` seconds, while
        traffic is dense: while bursts have been arriving, on average, less than `_DENSE` times that apart
        (then polling costs at most 1/_DENSE of a core more than sleeping would).

        Each turn of the loop polls the sockets without waiting while a callback is ready; a peer's next
        bytes are then read without the wake-up a sleeping process needs (tens of microseconds in a VM).
        A router whose traffic is sparse sleeps as usual, so polling costs nothing when idle."""
        if not self._busy_poll:
            return
        now = time.perf_counter()
        self._mean_gap += (now - self._last_burst - self._mean_gap) / 8  # moving average over ~8 bursts
        self._last_burst = now
        if self._mean_gap >= _DENSE * self._busy_poll:
            return
        polling = self._polling_until
        self._polling_until = now + self._busy_poll
        if not polling:
            asyncio.get_running_loop().call_soon(self._poll_again)

    def _poll_again(self) -> None:
        if time.perf_counter() < self._polling_until:
            # Polling must not starve a process sharing this CPU (a peer router, a client): let it run first.
            sched_yield()
            asyncio.get_running_loop().call_soon(self._poll_again)
        else:
            self._polling_until = 0.0

    def flush_touched(self) -> None:
        """Write the output of every connection marked since the last call (after `before_flush`)."""
        for finish in self.before_flush:
            finish()
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            self.flush(conn)

    def flush(self, conn: AmqpConnection) -> None:
        """Write everything proton has for the peer; close the socket once proton's output is finished."""
        if conn.freed or conn.socket is None:
            return
        transport = conn.transport
        buffer = self._buffer
        pieces = []
        while True:
            pending = pn_transport_pending(transport)
            if pending <= 0:
                break
            size = min(pending, _BUFFER_SIZE)
            pn_transport_peek(transport, buffer, size)
            pieces.append(unpack(buffer, size))
            pn_transport_pop(transport, size)
        if pieces:
            conn.socket.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if conn.unflushed:
            conn.unflushed = 0
            if conn.blocked:
                self.update_blocked(conn)
        if pending < 0 and not conn.socket.is_closing():
            conn.socket.close()  # asyncio writes what is buffered first

    def tick(self) -> None:
        """Time-driven work: heartbeats and idle time-outs, slow peers, expiry of queued messages."""
        now_ms = _now_ms()
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.freed:
                continue
            patience = max(conn.listener.idle_timeout, 5.0)
            if conn.sasl is not None:
                # Proton's idle time-out starts after SASL, which is ours: a peer stuck in it goes here.
                if now - conn.started > patience:
                    conn.abort("SASL not completed in time")
                continue
            if now_ms >= conn.deadline:
                conn.deadline = pn_transport_tick(conn.transport, now_ms)
                self.process()
                self.mark(conn)
            stuck = conn.slow_since
            if stuck is not None and now - stuck > patience:
                self._close_connection(conn, "amqp:resource-limit-exceeded", "peer is not reading its socket")
        self.core.tick(epoch_seconds())

    def release(self, conn: AmqpConnection) -> None:
        """The socket is gone: detach the connection's links from the core, free the proton objects."""
        if conn.freed:
            return
        conn.freed = True
        self.connections.discard(conn)
        self._dirty.discard(conn)
        if conn.transport and conn.sasl is None:  # proton has spoken with the peer: let it wind down
            pn_transport_close_tail(conn.transport)
            pn_transport_close_head(conn.transport)
            self.process()
        if conn.inter_router and self.mesh is not None:
            self.mesh.connection_lost(conn)
        for link in list(conn.links):
            self._forget_link(link)
        if conn.outgoing and not conn.inter_router and self.broker is not None:
            self.broker.connection_lost(conn)
        self.by_connection.pop(conn.connection, None)
        log.info(
            "connection closed: peer=%s container=%s reason=%s",
            conn.peer,
            conn.container,
            conn.reason or "closed",
        )
        if conn.transport:
            pn_transport_unbind(conn.transport)
            pn_decref(conn.transport)
            # Release ends the connection's endpoints; the reference pn_connection() gave is dropped apart
            # (without it, every connection's objects stayed allocated: 1.5-9 KiB each).
            pn_connection_release(conn.connection)
            pn_decref(conn.connection)
            conn.transport = conn.connection = ffi.NULL

    def close_all(self) -> None:
        """Shut down: a Close frame to every peer."""
        for conn in list(self.connections):
            conn.reason = "router shutting down"
            if conn.connection and conn.sasl is None:
                pn_connection_close(conn.connection)
                self.flush(conn)
            elif conn.socket is not None:
                conn.socket.close()

    def abort(self, conn: AmqpConnection, name: str, description: str) -> None:
        """Drop a connection now, without a closing handshake (its peer no longer answers): its links go at
        once, and what was sent on them comes back to the producers."""
        conn.reason = conn.reason or f"{name}: {description}"
        if conn.socket is not None:
            conn.socket.abort()

    def _close_connection(self, conn: AmqpConnection, name: str, description: str) -> None:
        if conn.sasl is not None:  # no AMQP spoken yet: nothing to close but the socket
            conn.abort(f"{name}: {description}")
            return
        conn.reason = f"{name}: {description}"
        pn.set_condition(pn_connection_condition(conn.connection), name, description)
        pn_connection_close(conn.connection)
        self.flush(conn)
        if conn.socket is None:
            return
        if conn.slow_since is not None:
            conn.socket.abort()  # its buffer will never drain
        else:
            conn.socket.close()

    def update_blocked(self, conn: AmqpConnection) -> None:
        """Hold back or release the connection's consumer links as its unwritten output crosses the mark."""
        blocked = conn.slow_since is not None or conn.unflushed > WRITE_HIGH_WATER
        if blocked == conn.blocked:
            return
        conn.blocked = blocked
        now = epoch_seconds()
        for handle in list(conn.links):
            link = self.links.get(handle)
            if isinstance(link, ConsumerLink):
                if blocked:
                    link.blocked = True
                else:
                    self.core.unblock(link, now)

    # -- events --------------------------------------------------------------------------------------

    def process(self) -> None:
        """Handle every event in the collector."""
        collector = self.collector
        handlers = self._handlers
        while True:
            event = pn_collector_peek(collector)
            if not event:
                if not self._settle_later:
                    return
                self._settle_consumers()
                continue
            kind: int = pn_event_type(event)
            try:
                if kind == PN_DELIVERY:
                    self._on_delivery(event)  # the hot event: a direct call once compiled
                else:
                    handler = handlers.get(kind)  # None for most, PN_TRANSPORT above all
                    if handler is not None:
                        handler(event)
            except Exception:
                conn = self.by_connection.get(pn_event_connection(event))
                log.exception("internal error handling an event; closing connection %s", conn and conn.peer)
                if conn is not None:
                    self._close_connection(conn, "amqp:internal-error", "router internal error")
            finally:
                pn_collector_pop(collector)

    def _on_connection_open(self, event: CData) -> None:
        connection = pn_event_connection(event)
        conn = self.by_connection.get(connection)
        if conn is None:
            return
        conn.container = pn.text(pn_connection_remote_container(connection))
        if not conn.outgoing:
            pn_connection_open(connection)
        log.info("connection opened: peer=%s container=%s user=%s", conn.peer, conn.container, conn.user)
        if conn.inter_router and self.mesh is not None:
            self.mesh.connection_opened(conn)
        elif conn.outgoing and self.broker is not None:
            self.broker.connection_opened(conn)
        self.mark(conn)

    def _on_connection_close(self, event: CData) -> None:
        connection = pn_event_connection(event)
        conn = self.by_connection.get(connection)
        if conn is None:
            return
        error = pn.condition(pn_connection_remote_condition(connection))
        conn.reason = f"peer closed: {error[0]}: {error[1]}" if error else "peer closed"
        pn_connection_close(connection)
        self.mark(conn)

    def _on_session_open(self, event: CData) -> None:
        session = pn_event_session(event)
        pn_session_open(session)

    def _on_session_close(self, event: CData) -> None:
        session = pn_event_session(event)
        conn = self.by_connection.get(pn_session_connection(session))
        if conn is not None:
            for handle in [h for h in conn.links if pn_link_session(h) == session]:
                self._forget_link(handle)
            if conn.outgoing and not conn.inter_router and self.broker is not None:
                self.broker.session_closed(conn, session)
        pn_session_close(session)

    def _on_transport_error(self, event: CData) -> None:
        transport = pn_event_transport(event)
        conn = self.by_connection.get(pn_transport_connection(transport))
        error = pn.condition(pn_transport_condition(transport))
        if conn is not None and error is not None and conn.reason is None:  # the first error is the cause
            conn.reason = f"{error[0]}: {error[1]}"
            log.warning("connection error: peer=%s %s: %s", conn.peer, error[0], error[1])

    def _on_transport_closed(self, event: CData) -> None:
        conn = self.by_connection.get(pn_transport_connection(pn_event_transport(event)))
        if conn is not None:
            self.mark(conn)

    # -- links ---------------------------------------------------------------------------------------

    def _on_link_open(self, event: CData) -> None:
        handle = pn_event_link(event)
        conn = self.by_connection.get(pn_session_connection(pn_link_session(handle)))
        if conn is None:
            return
        if conn.inter_router and self.mesh is not None:
            self.mesh.link_opened(conn, handle)
            self.mark(conn)
            return
        if conn.outgoing and self.broker is not None:  # a broker answering the attach of a link of ours
            self.broker.link_opened(conn, handle)
            self.mark(conn)
            return
        try:
            if pn_link_is_sender(handle):
                link: ProducerLink | ConsumerLink = self._attach_consumer(handle, conn)
            else:
                link = self._attach_producer(handle, conn)
        except AttachError as error:
            pn.set_condition(pn_link_condition(handle), error.condition, error.description)
            pn_link_open(handle)
            pn_link_close(handle)
            log.info("attach refused: peer=%s %s", conn.peer, error.description)
            self.mark(conn)
            return
        self.track(handle, link)
        pn_link_open(handle)
        self.mark(conn)

    def track(self, handle: CData, link: ProducerLink | ConsumerLink) -> None:
        """A proton link the core routes for: its events reach the core, and it goes with its connection."""
        self.links[handle] = link
        owner: AmqpConnection = link.owner
        owner.links.add(handle)

    def _attach_consumer(self, handle: CData, conn: AmqpConnection) -> ConsumerLink:
        remote = pn_link_remote_source(handle)
        dynamic = bool(pn_terminus_is_dynamic(remote))
        address = None if dynamic else pn.terminus_address(remote)
        if address is None and not dynamic:
            raise AttachError(
                "amqp:invalid-field", "a receiving link needs a source address or a dynamic source"
            )
        try:
            pool = pn.string_field(pn_link_remote_properties(handle), POOL_PROPERTY)
        except TypeError:
            where = "a dynamic address" if address is None else repr(address)
            raise AttachError(
                "amqp:invalid-field",
                f"receiving link on {where}: link property {POOL_PROPERTY!r} must be a string"
                " (the name of the consumer's pool)",
            ) from None
        settle_on_send = pn_link_remote_snd_settle_mode(handle) == PN_SND_SETTLED
        link = self.core.attach_consumer(handle, address, settle_on_send, conn, pool=pool)
        local = pn_link_source(handle)
        pn_terminus_copy(local, remote)
        pn_terminus_copy(pn_link_target(handle), pn_link_remote_target(handle))
        pn_link_set_snd_settle_mode(handle, pn_link_remote_snd_settle_mode(handle))
        pn_link_set_rcv_settle_mode(handle, pn_link_remote_rcv_settle_mode(handle))
        if dynamic:
            pn_terminus_set_address(local, link.address.encode())
        if link.pool is not None:  # the pool in effect (none on a multicast address)
            pn.put_symbol_map(pn_link_properties(handle), {POOL_PROPERTY: link.pool})
        return link

    def _attach_producer(self, handle: CData, conn: AmqpConnection) -> ProducerLink:
        listener = conn.listener
        remote = pn_link_remote_target(handle)
        dynamic = bool(pn_terminus_is_dynamic(remote))
        address = pn.terminus_address(remote)
        link = self.core.attach_producer(handle, address, listener.link_capacity, conn, dynamic)
        address = link.address
        local = pn_link_target(handle)
        pn_terminus_copy(local, remote)
        pn_terminus_copy(pn_link_source(handle), pn_link_remote_source(handle))
        pn_link_set_snd_settle_mode(handle, pn_link_remote_snd_settle_mode(handle))
        if listener.max_message_size:
            pn_link_set_max_message_size(handle, listener.max_message_size)
        if dynamic and address is not None:
            pn_terminus_set_address(local, address.encode())
        return link

    def _on_link_close(self, event: CData) -> None:
        handle = pn_event_link(event)
        conn = self.by_connection.get(pn_session_connection(pn_link_session(handle)))
        if conn is not None and conn.outgoing and not conn.inter_router and self.broker is not None:
            self.broker.link_closed(conn, handle)
        self._forget_link(handle)
        pn_link_close(handle)
        pn_link_free(handle)  # churning links (one per request, as old drivers do) must not accumulate
        if conn is not None:
            self.mark(conn)

    def _forget_link(self, handle: CData) -> None:
        link = self.links.pop(handle, None)
        if link is None:
            return
        owner: AmqpConnection = link.owner
        owner.links.discard(handle)
        if isinstance(link, ProducerLink):
            for delivery_handle in [
                d for d, s in self.streams.items() if s.delivery and s.delivery.link is link
            ]:
                self._abort_stream(delivery_handle)
            self.core.detach_producer(link)
        else:
            self.core.detach_consumer(link, epoch_seconds())

    def _on_flow(self, event: CData) -> None:
        handle = pn_event_link(event)
        link = self.links.get(handle)
        if isinstance(link, ConsumerLink):
            self.core.consumer_credit(
                link, pn_link_credit(handle), bool(pn_link_get_drain(handle)), epoch_seconds()
            )

    # -- deliveries ----------------------------------------------------------------------------------

    def _on_delivery(self, event: CData) -> None:
        delivery = pn_event_delivery(event)
        handle = pn_delivery_link(delivery)
        link = self.links.get(handle)
        if link is None:
            if self.mesh is not None and handle in self.mesh.control:
                self.mesh.control_delivery(handle, delivery)
            return
        if link.__class__ is ConsumerLink:
            # A consumer's disposition of a delivery we sent it.
            settled: bool = pn_delivery_settled(delivery)
            kind: int = pn_delivery_remote_state(delivery)
            if kind or settled:
                outcome = _OUTCOMES.get(kind) or _read_outcome(delivery, kind)
                self.core.consumer_outcome(link, delivery, outcome, settled)
                if settled:
                    self._settle_later.append((link, delivery))
            return
        assert isinstance(link, ProducerLink)
        if self.streams and delivery in self.streams:
            self._continue(delivery, handle)
        elif delivery in link.inflight:  # forwarded, unsettled: an update from the producer
            if pn_delivery_settled(delivery):  # it settled first: it no longer wants the outcome
                self.core.producer_settled(link, delivery)
                pn_delivery_settle(delivery)
        else:
            self._arrive(link, delivery, handle)

    def _read(self, link_handle: CData, delivery: CData) -> bytes:
        size: int = pn_delivery_pending(delivery)
        # Frames of a large message may be waiting together: a buffer for them alone, not kept.
        buffer = self._buffer if size <= _BUFFER_SIZE else ffi.new("char[]", size)
        count = pn_link_recv(link_handle, buffer, size)
        return unpack(buffer, count) if count > 0 else b""

    def _arrive(self, link: ProducerLink, delivery: CData, handle: CData) -> None:
        payload = self._read(handle, delivery)
        if not payload and pn_delivery_aborted(delivery):  # aborted before its first byte reached us
            pn_link_advance(handle)
            pn_delivery_settle(delivery)
            return
        partial: bool = pn_delivery_partial(delivery)
        owner: AmqpConnection = link.owner
        limit = owner.max_message_size
        if limit and len(payload) > limit:
            self._refuse(link, delivery, handle, partial, _too_large(limit))
            return
        now = epoch_seconds()
        to, ttl, expiry, scan = peek(payload)
        if scan is Scan.MALFORMED:
            self._refuse(link, delivery, handle, partial, MALFORMED)
            return
        if partial and scan is Scan.INCOMPLETE:
            # The headers did not fit in the first frames: wait for more (bounded by MAX_HEADERS).
            self.streams[delivery] = _Stream(len(payload), bytearray(payload))
            return
        deadline = None if ttl is None and not expiry else _deadline(now, ttl, expiry)
        self._route(link, delivery, handle, payload, partial, to, deadline, now)

    def _route(
        self,
        link: ProducerLink,
        delivery: CData,
        handle: CData,
        payload: bytes | bytearray,
        partial: bool,
        to: str | None,
        deadline: float | None,
        now: float,
    ) -> None:
        """Hand a delivery to the core: whole, or its first part (the rest streams through `_continue`)."""
        settled: bool = pn_delivery_settled(delivery)
        ingress: str | None = None
        trace: tuple[str, ...] = ()
        dest: str | None = None
        owner: AmqpConnection = link.owner
        if owner.inter_router:  # from another router: where it entered the mesh, its path, where it goes
            try:
                (ingress, trace, via, dest), payload = take(payload)  # for a client: the producer's message
            except AnnotationError as error:
                self._refuse(link, delivery, handle, partial, rejected("amqp:decode-error", str(error)))
                return
            if via is not None:
                to = via
        stream = None
        if partial:
            stream = self.streams.get(delivery) or _Stream(len(payload))
            stream.buffer = None
            self.streams[delivery] = stream  # before routing: copies started now are its outputs
        else:
            pn_link_advance(handle)  # before routing: settling it (no consumer) must not advance the link
        routed = self.core.deliver(
            link,
            delivery,
            bytearray(payload) if partial else payload,
            complete=not partial,
            settled=settled,
            to=to,
            deadline=deadline,
            now=now,
            ingress=ingress,
            trace=trace,
            dest=dest,
        )
        if stream is not None:
            stream.delivery = routed
        elif settled:
            pn_delivery_settle(delivery)

    def _continue(self, delivery: CData, handle: CData) -> None:
        """More of a multi-frame delivery, or its abort."""
        stream = self.streams[delivery]
        link = self.links[handle]
        assert isinstance(link, ProducerLink)
        if pn_delivery_aborted(delivery):
            self._abort_stream(delivery)
            return
        chunk = self._read(handle, delivery)
        partial = bool(pn_delivery_partial(delivery))
        stream.received += len(chunk)
        owner: AmqpConnection = link.owner
        limit = owner.max_message_size
        if stream.refusal is None and limit and stream.received > limit:
            stream.refusal = _too_large(limit)
        if stream.refusal is not None:
            self._refuse(link, delivery, handle, partial, stream.refusal, stream)
            return
        routed = stream.delivery
        if routed is None:
            buffered = stream.buffer
            assert buffered is not None
            buffered += chunk
            to, ttl, expiry, scan = peek(bytes(buffered))  # rare: headers spread over frames
            if scan is Scan.MALFORMED or (scan is Scan.INCOMPLETE and len(buffered) > MAX_HEADERS):
                self._refuse(link, delivery, handle, partial, MALFORMED, stream)
            elif scan is not Scan.INCOMPLETE or not partial:
                now = epoch_seconds()
                deadline = None if ttl is None and not expiry else _deadline(now, ttl, expiry)
                if not partial:
                    del self.streams[delivery]
                self._route(link, delivery, handle, buffered, partial, to, deadline, now)
            return
        if routed.queued or routed.gathering:
            assert isinstance(routed.payload, bytearray)
            routed.payload += chunk
        for consumer, _ in stream.outputs:
            if not consumer.closed:
                pn_link_send(consumer.handle, chunk, len(chunk))
                receiver: AmqpConnection = consumer.owner
                receiver.unflushed += len(chunk)
                self.mark(receiver)
        if partial:
            return
        del self.streams[delivery]
        pn_link_advance(handle)
        routed.complete = True
        if pn_delivery_settled(delivery):
            pn_delivery_settle(delivery)
        now = epoch_seconds()
        for consumer, out in stream.outputs:
            if not consumer.closed:
                pn_link_advance(consumer.handle)
                if routed.settled or consumer.settle_on_send:
                    pn_delivery_settle(out)
                self.core.stream_finished(consumer, now)

    def _abort_stream(self, delivery: CData) -> None:
        stream = self.streams.pop(delivery)
        self._abort_outputs(stream)
        if stream.delivery is not None:
            self.core.abort(stream.delivery)
        pn_delivery_settle(delivery)

    def _abort_outputs(self, stream: _Stream) -> None:
        """Abort the consumers' copies of a multi-frame delivery that will not complete."""
        now = epoch_seconds()
        for consumer, out in stream.outputs:
            if not consumer.closed:
                pn_delivery_abort(out)
                self.mark(consumer.owner)
                self.core.stream_finished(consumer, now, aborted=out)
        stream.outputs = []

    def _refuse(
        self,
        link: ProducerLink,
        delivery: CData,
        handle: CData,
        partial: bool,
        outcome: Outcome,
        stream: _Stream | None = None,
    ) -> None:
        """Discard the rest of a message the router will not forward; reject it once all of it has arrived."""
        if stream is None:
            stream = self.streams.setdefault(delivery, _Stream(0))
        stream.refusal = stream.refusal or outcome
        self._abort_outputs(stream)  # once: it empties the outputs
        if partial:
            return
        self.streams.pop(delivery, None)
        pn_link_advance(handle)
        if stream.delivery is not None:
            self.core.refuse(stream.delivery, outcome)
        else:
            if not pn_delivery_settled(delivery):
                _write_outcome(delivery, outcome)
            pn_delivery_settle(delivery)
            self.core.refused_arrival(link)

    def _settle_consumers(self) -> None:
        """Free the deliveries consumers settled, after the batch of events that reported them.

        Each settlement on a connection posts a PN_TRANSPORT event; settling the consumers' side in one
        go, rather than alternating with the producers' side, lets proton fold those events into one.
        """
        batch, self._settle_later = self._settle_later, []
        for link, delivery in batch:
            if not link.closed:
                pn_delivery_settle(delivery)

    # -- the core's Edge protocol ------------------------------------------------------------------

    def send(self, link: ConsumerLink, delivery: Delivery) -> CData:
        handle = link.handle
        # Tags need only be unique among a link's unsettled deliveries: one counter serves all links.
        self._tag[0] += 1
        out = pn_delivery(handle, self._tag_bytes)
        payload = delivery.payload
        if link.router is not None:  # to another router: with where it entered the mesh and its path
            router_id = self.router_id
            payload = stamp(
                payload,
                delivery.ingress or router_id,
                (*delivery.trace, router_id),
                delivery.address,
                delivery.dest,
            )
        size = len(payload)
        # cffi passes a bytes object to a `char *` as it is; other buffers need wrapping (0.2 us more).
        pn_link_send(handle, payload if isinstance(payload, bytes) else from_buffer(payload), size)
        conn: AmqpConnection = link.owner
        conn.unflushed += size
        if conn.unflushed > WRITE_HIGH_WATER and not conn.blocked:
            self.update_blocked(conn)
        if delivery.complete:
            pn_link_advance(handle)
            if delivery.settled or link.settle_on_send:
                pn_delivery_settle(out)
        else:
            self.streams[delivery.handle].outputs.append((link, out))
        self.mark(conn)
        return out

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        link = delivery.link
        if link.closed:
            return
        handle = delivery.handle
        if outcome.kind == ACCEPTED_KIND:
            pn_delivery_update(handle, ACCEPTED_KIND)
        else:
            _write_outcome(handle, outcome)
        pn_delivery_settle(handle)
        self.mark(link.owner)

    def update(self, delivery: Delivery, outcome: Outcome) -> None:
        if not delivery.link.closed:
            _write_outcome(delivery.handle, outcome)
            self.mark(delivery.link.owner)

    def flow(self, link: ProducerLink, credit: int) -> None:
        pn_link_flow(link.handle, credit)
        self.mark(link.owner)

    def withdraw_credit(self, link: ProducerLink) -> None:
        # A receiver may lower the credit it gave: the next flow frame tells the producer it has none.
        pn_link_flow(link.handle, -pn_link_credit(link.handle))
        self.mark(link.owner)

    def drained(self, link: ConsumerLink) -> None:
        pn_link_drained(link.handle)
        self.mark(link.owner)


# Traffic is dense, and worth polling for, while bursts arrive on average less than this many busy_poll
# windows apart.
_DENSE: Final = 5


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _too_large(limit: int) -> Outcome:
    return rejected("amqp:link:message-size-exceeded", f"message larger than the limit of {limit} bytes")


def _deadline(now: float, ttl: int | None, expiry: int | None) -> float:
    """When a message expires, in epoch seconds, from its header's ttl or else its absolute-expiry-time (ms).

    The ttl wins when both are set: it needs no clock shared with the sender, and some senders fill
    absolute-expiry-time from a monotonic clock (oslo.messaging 14's AMQP 1.0 driver: seconds since boot,
    which reads as 1970), which would expire every message on arrival."""
    if ttl is not None:
        return now + ttl / 1000
    return expiry / 1000 if expiry else now


def _read_outcome(delivery: CData, kind: int) -> Outcome:
    remote = pn_delivery_remote(delivery)
    if kind == REJECTED_KIND:
        return Outcome(kind, error=pn.condition(pn_disposition_condition(remote)))
    if kind == MODIFIED_KIND:
        return Outcome(
            kind,
            delivery_failed=bool(pn_disposition_is_failed(remote)),
            undeliverable_here=bool(pn_disposition_is_undeliverable(remote)),
        )
    return Outcome(kind or RELEASED_KIND)


def _write_outcome(delivery: CData, outcome: Outcome) -> None:
    local = pn_delivery_local(delivery)
    if outcome.kind == REJECTED_KIND and outcome.error is not None:
        pn.set_condition(pn_disposition_condition(local), *outcome.error)
    elif outcome.kind == MODIFIED_KIND:
        pn_disposition_set_failed(local, outcome.delivery_failed)
        pn_disposition_set_undeliverable(local, outcome.undeliverable_here)
    pn_delivery_update(delivery, outcome.kind)
