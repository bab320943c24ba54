"""One AMQP connection on a socket: bytes in and out of its proton transport, and SASL before that.

Rules of this module:
1. It moves bytes: socket -> SASL (ours, see sasl.py) -> proton transport -> socket. It handles no events:
   the shared collector's events are the Engine's (engine.py) to dispatch.
2. It owns the life of its proton objects and frees them exactly once, when the socket is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from cproton_ffi import ffi

from meshbus.amqp.pn import (
    CData,
    pn_sasl,
    pn_sasl_allowed_mechs,
    pn_transport,
    pn_transport_bind,
    pn_transport_capacity,
    pn_transport_close_tail,
    pn_transport_push,
    pn_transport_require_auth,
    pn_transport_set_idle_timeout,
    pn_transport_set_max_frame,
    pn_transport_set_server,
    pn_transport_set_tracer,
)
from meshbus.amqp.sasl import SaslError, SaslServer, SaslState
from meshbus.config import ListenerConfig

if TYPE_CHECKING:
    from meshbus.amqp.engine import Engine


log = logging.getLogger("meshbus.connection")

# The router stops sending to a connection holding more than this many bytes not yet written to its socket,
# and again while the socket's own buffer holds more than this: memory per slow consumer stays bounded.
WRITE_HIGH_WATER: Final = 1 << 20


class AmqpConnection:
    """The asyncio side of one client connection: an asyncio protocol by its methods. (It is compiled with
    mypyc, whose classes cannot derive from asyncio.Protocol; asyncio needs only the methods.)"""

    def __init__(
        self, engine: Engine, listener: ListenerConfig, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.engine = engine
        self.listener = listener  # for a connector's connection: its settings in the same shape
        self.max_message_size = listener.max_message_size  # read per message: kept at hand
        self.inter_router = listener.role == "inter-router"  # read per message: kept at hand
        self.outgoing = on_lost is not None
        self.on_lost = on_lost
        self.socket: asyncio.Transport | None = None
        self.peer = "?"
        self.container: str | None = None
        self.user: str | None = None
        self.sasl: SaslServer | None = (
            None
            if self.outgoing
            else SaslServer(engine.mechanisms(listener), allow_no_sasl=not listener.authenticate_peer)
        )
        self.transport: CData = ffi.NULL
        self.connection: CData = ffi.NULL
        self.links: set[CData] = set()
        self.deadline = 0  # next pn_transport_tick, ms (monotonic); 0 = none
        self.started = time.monotonic()
        self.slow_since: float | None = None  # when the socket's write buffer filled up
        self.unflushed = 0  # payload bytes handed to proton since the last flush
        self.blocked = False  # its consumer links are held back (see WRITE_HIGH_WATER)
        self.reason: str | None = None
        self.proton_said: str | None = None  # proton's last report of it (see Engine.proton_says)
        self.verifying = False  # a password check is running off the event loop
        self.freed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        socket: asyncio.Transport = transport  # type: ignore[assignment]  # a stream transport; uvloop's is no subclass
        self.socket = socket
        socket.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.transport = pn_transport()
        pn_transport_set_tracer(self.transport, self.engine.proton_tracer)
        if self.outgoing:
            pn_sasl_allowed_mechs(pn_sasl(self.transport), b"ANONYMOUS")
        else:
            pn_transport_set_server(self.transport)
            pn_transport_require_auth(self.transport, False)
        pn_transport_set_max_frame(self.transport, self.listener.max_frame_size)
        pn_transport_set_idle_timeout(self.transport, int(self.listener.idle_timeout * 1000))
        self.connection = self.engine.new_connection(self)
        pn_transport_bind(self.transport, self.connection)
        self.engine.connections.add(self)
        if self.outgoing:
            self.engine.open_outgoing(self)

    def data_received(self, data: bytes) -> None:
        if self.sasl is not None:
            data = self._negotiate(data)
            if not data:
                return
        self.push(data)

    def eof_received(self) -> bool | None:
        if not self.freed:
            self.reason = self.reason or "peer closed the socket"
            pn_transport_close_tail(self.transport)
            self.engine.process()
            self.engine.flush(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.reason is None:
            self.reason = f"socket error: {exc}"
        self.engine.release(self)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self.slow_since = time.monotonic()
        self.engine.update_blocked(self)

    def resume_writing(self) -> None:
        self.slow_since = None
        self.engine.update_blocked(self)

    # -- SASL ----------------------------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> bytes:
        sasl = self.sasl
        assert sasl is not None
        try:
            sasl.receive(data)
        except SaslError as error:
            self._sasl_write()
            self.abort(f"SASL: {error}")
            return b""
        return self._sasl_progress()

    def _sasl_write(self) -> None:
        assert self.sasl is not None and self.socket is not None
        out = self.sasl.data_to_send()
        if out:
            self.socket.write(out)

    def _sasl_progress(self) -> bytes:
        sasl = self.sasl
        assert sasl is not None
        self._sasl_write()
        state = sasl.state
        if state is SaslState.VERIFYING and sasl.credentials is not None and not self.verifying:
            self.verifying = True
            user, password = sasl.credentials
            future = self.engine.verify_password(user, password)
            future.add_done_callback(self._verified)
        elif state is SaslState.FAILED:
            self.abort(f"SASL: {sasl.failure}")
        elif state in (SaslState.DONE, SaslState.NO_SASL):
            self.user = sasl.user
            self.sasl = None
            return sasl.take_remaining()
        return b""

    def _verified(self, future: asyncio.Future[bool]) -> None:
        self.verifying = False
        if self.freed or self.sasl is None:
            return
        self.sasl.verified(bool(future.result()))
        rest = self._sasl_progress()
        if rest:
            self.push(rest)

    # -- proton transport ------------------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        """Feed the peer's bytes to proton, as much as it takes, and let the engine handle the events."""
        transport = self.transport
        offset = 0
        while offset < len(data):
            capacity = pn_transport_capacity(transport)
            if capacity <= 0:
                break  # input side closed (error or Close): the rest is ignored
            # cffi passes bytes to a `char *` as they are, without a copy; a larger read goes in pieces.
            chunk = data if offset == 0 and capacity >= len(data) else data[offset : offset + capacity]
            pn_transport_push(transport, chunk, len(chunk))
            offset += len(chunk)
            self.engine.process()
        self.engine.mark(self)
        self.engine.flush_touched()  # now, not later in the loop turn: the peers are waiting (RPC latency)
        self.engine.keep_polling()

    def abort(self, reason: str) -> None:
        """Close the socket now: for a peer we will not speak AMQP with."""
        self.reason = self.reason or reason
        if self.socket is not None and not self.socket.is_closing():
            self.socket.close()

    def __repr__(self) -> str:
        return f"<connection {self.peer} {self.container or '?'}>"

    def describe(self) -> dict[str, Any]:
        return {"peer": self.peer, "container": self.container, "user": self.user}
