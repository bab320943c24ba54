"""Inter-router connections: connectors, the mesh's links on each connection, and the routing protocol's
outbox and timer.

Rules of this module:
1. It is the edge of the mesh: it turns inter-router connections and their links into `MeshNode` events
   (meshbus.mesh, which decides everything about routes) and the node's actions into proton calls and
   core calls (`set_routes`, `remote_changed`). Forwarding stays in the core; framing in engine.py.
2. Every inter-router connection carries four links, all attached by the side that connected (the
   connector's): a control link each way (`_mesh/control`: protocol messages, pre-settled, one AMQP map
   body each) and a data link each way (`_mesh/data`: deliveries, routed by the core, with the mesh's
   annotations). The neighbour is link-up for the mesh once both control links are open.
3. A connector keeps its connection up: it reconnects after a loss, with exponential back-off and jitter.
4. Time for the node is the event loop's monotonic clock; the node's `tick` runs when `next_tick()` says.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

from cproton_ffi import ffi, lib
from proton import Message as AmqpMessage

from meshbus.amqp import pn
from meshbus.amqp.connection import AmqpConnection
from meshbus.amqp.pn import CData
from meshbus.config import ConnectorConfig, ListenerConfig
from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import Event, NeighbourDown
from meshbus.mesh.messages import Message, decode
from meshbus.mesh.node import MeshNode, RoutingTable
from meshbus.router.core import DYNAMIC_PREFIX, MESH_PREFIX

if TYPE_CHECKING:
    from meshbus.amqp.engine import Engine

log = logging.getLogger("meshbus.mesh")

CONTROL: Final = f"{MESH_PREFIX}control"
DATA: Final = f"{MESH_PREFIX}data"
# Addresses the mesh does not advertise: its own, and dynamic ones (reached through the router they name).
_NOT_ADVERTISED: Final = (MESH_PREFIX, DYNAMIC_PREFIX)
CONTROL_CREDIT: Final = 1000  # protocol messages the peer may send ahead; topped up at half
RECONNECT_FIRST: Final = 0.05  # seconds before a connector's first retry
RECONNECT_MAX: Final = 2.0  # the back-off's ceiling: a router that comes back is rejoined within this


class _Peer:
    """The mesh's links on one inter-router connection."""

    __slots__ = ("control_in", "control_out", "up")

    def __init__(self) -> None:
        self.control_in: CData = ffi.NULL
        self.control_out: CData = ffi.NULL
        self.up = False  # told to the node with link_up


class MeshEdge:
    """The routing protocol of this router, wired to its connections and its forwarding core: the node's
    `Outbox` and the core's `Watcher`."""

    def __init__(self, engine: Engine, router_id: str, config: MeshConfig) -> None:
        self.engine = engine
        self.router_id = router_id
        self.node = MeshNode(router_id, time.time_ns(), config, self, random.Random())
        self.control: dict[CData, AmqpConnection] = {}  # control receivers -> their connection
        self._peers: dict[AmqpConnection, _Peer] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tag = 0
        engine.core.watchers.append(self)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- connections and links -----------------------------------------------------------------------

    def connection_opened(self, conn: AmqpConnection) -> None:
        """An inter-router connection is open both ways; the side that connected attaches the links."""
        if conn.container == self.router_id:
            log.error(
                "inter-router connection from %s claims this router's own id %r (a connector to itself, or a "
                "duplicate id); closing it: give each router a unique [router] id",
                conn.peer,
                self.router_id,
            )
            self.engine.abort(conn, "amqp:connection:forced", "router id is this router's own")
            return
        try:
            role = pn.string_field(lib.pn_connection_remote_properties(conn.connection), pn.ROLE_PROPERTY)
        except TypeError:
            role = None
        if role != "inter-router":
            where = "connector to" if conn.outgoing else "inter-router listener, connection from"
            log.error(
                "%s %s: the peer (container %s) is not a meshbus router on an inter-router port; closing: "
                "point connectors at an inter-router listener, and clients at a normal one",
                where,
                conn.peer,
                conn.container,
            )
            self.engine.abort(conn, "amqp:connection:forced", "not an inter-router peer")
            return
        self._peers[conn] = _Peer()
        if not conn.outgoing:
            return
        session = lib.pn_session(conn.connection)
        lib.pn_session_open(session)
        for name, sender, address in (
            ("mesh-control-out", True, CONTROL),
            ("mesh-control-in", False, CONTROL),
            ("mesh-data-out", True, DATA),
            ("mesh-data-in", False, DATA),
        ):
            link = (lib.pn_sender if sender else lib.pn_receiver)(session, name.encode())
            # Both ends name the address, so that either side reads it from the target.
            lib.pn_terminus_set_address(lib.pn_link_source(link), address.encode())
            lib.pn_terminus_set_address(lib.pn_link_target(link), address.encode())
            if address == CONTROL and sender:
                lib.pn_link_set_snd_settle_mode(link, lib.PN_SND_SETTLED)
            lib.pn_link_open(link)
            self._register(conn, link)

    def link_opened(self, conn: AmqpConnection, link: CData) -> None:
        """A link of an inter-router connection: attached by the peer, or our own link's attach answered."""
        if lib.pn_link_state(link) & lib.PN_LOCAL_UNINIT:  # the peer attached it: answer in kind
            address = pn.terminus_address(lib.pn_link_remote_target(link))
            if conn not in self._peers or address not in (CONTROL, DATA):
                pn.set_condition(
                    lib.pn_link_condition(link),
                    "amqp:not-allowed",
                    f"an inter-router connection carries only {CONTROL} and {DATA} links",
                )
                lib.pn_link_open(link)
                lib.pn_link_close(link)
                return
            lib.pn_terminus_copy(lib.pn_link_source(link), lib.pn_link_remote_source(link))
            lib.pn_terminus_copy(lib.pn_link_target(link), lib.pn_link_remote_target(link))
            lib.pn_link_set_snd_settle_mode(link, lib.pn_link_remote_snd_settle_mode(link))
            lib.pn_link_open(link)
            self._register(conn, link)
        peer = self._peers.get(conn)
        if peer is None or peer.up or not peer.control_in or not peer.control_out:
            return
        if not _remote_open(peer.control_in) or not _remote_open(peer.control_out):
            return
        peer.up = True
        self.node.link_up(conn, conn.listener.cost, self._now())
        self._reschedule()

    def _register(self, conn: AmqpConnection, link: CData) -> None:
        """Put a link of ours to its use: control, or data through the core."""
        peer = self._peers[conn]
        sender = bool(lib.pn_link_is_sender(link))
        address = pn.terminus_address(lib.pn_link_target(link))
        engine = self.engine
        neighbour = conn.container or "?"
        if address == CONTROL:
            if sender:
                peer.control_out = link
            else:
                peer.control_in = link
                self.control[link] = conn
                lib.pn_link_flow(link, CONTROL_CREDIT)
            return
        if sender:
            engine.track(link, engine.core.attach_router_link(link, neighbour, conn))
        else:
            capacity = conn.listener.link_capacity
            engine.track(link, engine.core.attach_producer(link, None, capacity, conn, from_router=True))

    def connection_lost(self, conn: AmqpConnection) -> None:
        peer = self._peers.pop(conn, None)
        if peer is None:
            return
        self.control.pop(peer.control_in, None)
        if peer.up:
            self.node.link_down(conn, self._now())
            self._reschedule()

    # -- protocol messages ---------------------------------------------------------------------------

    def control_delivery(self, link: CData, delivery: CData) -> None:
        """A protocol message arrived (or a part of one) on a control link."""
        if lib.pn_delivery_partial(delivery):
            return  # proton keeps the frames until the message is complete
        size = lib.pn_delivery_pending(delivery)
        buffer = ffi.new("char[]", max(size, 1))
        count = lib.pn_link_recv(link, buffer, size)
        lib.pn_link_advance(link)
        lib.pn_delivery_settle(delivery)
        conn = self.control[link]
        if lib.pn_link_credit(link) < CONTROL_CREDIT // 2:
            lib.pn_link_flow(link, CONTROL_CREDIT - lib.pn_link_credit(link))
        try:
            message = AmqpMessage()
            message.decode(ffi.unpack(buffer, max(count, 0)))
            decoded = decode(message.body)
        except Exception as error:  # MessageError, or proton's own for a body that is not AMQP
            log.warning(
                "dropped a malformed protocol message from %s (%s): %s",
                conn.container,
                conn.peer,
                error,
            )
            return
        self.node.handle(conn, decoded, self._now())
        self._reschedule()

    # -- the node's Outbox ---------------------------------------------------------------------------

    def send(self, link: object, message: Message) -> None:
        conn = cast(AmqpConnection, link)
        peer = self._peers.get(conn)
        if peer is None or not peer.control_out or conn.freed:
            return
        body = bytes(AmqpMessage(body=message.to_dict()).encode())
        self._tag += 1
        tag = str(self._tag).encode()
        delivery = lib.pn_delivery(peer.control_out, (len(tag), ffi.from_buffer(tag)))
        lib.pn_link_send(peer.control_out, body, len(body))
        lib.pn_link_advance(peer.control_out)
        lib.pn_delivery_settle(delivery)
        self.engine.mark(conn)

    def routes_changed(self, table: RoutingTable) -> None:
        self.engine.core.set_routes(table.routes, table.multicast)

    def addresses_changed(self, changes: Mapping[str, frozenset[str]]) -> None:
        core = self.engine.core
        for address, routers in changes.items():
            core.remote_changed(address, routers)

    def report(self, event: Event) -> None:
        log.info("%s", event)
        if isinstance(event, NeighbourDown):
            conn = cast(AmqpConnection, event.link)
            if not conn.freed:
                # Silent (or it restarted): what was sent through it comes back to the producers now.
                self.engine.abort(conn, "amqp:resource-limit-exceeded", f"neighbour down: {event.reason}")

    # -- the core's Watcher --------------------------------------------------------------------------

    def local_consumers(self, address: str, present: bool) -> None:
        if address.startswith(_NOT_ADVERTISED):
            return
        now = self._now()
        if present:
            self.node.local_address_added(address, now)
        else:
            self.node.local_address_removed(address, now)
        self._reschedule()

    def reachable(self, address: str, present: bool) -> None:
        """Not the mesh's concern: it advertises local consumers only."""

    # -- time ----------------------------------------------------------------------------------------

    def _reschedule(self) -> None:
        due = self.node.next_tick()
        if due >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = due
        self._timer = loop.call_at(max(due, loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        try:
            self.node.tick(self._now())
        except Exception:
            log.exception("internal error in the mesh's timer")
        self._reschedule()
        self.engine.flush_touched()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _remote_open(link: CData) -> bool:
    return bool(lib.pn_link_state(link) & lib.PN_REMOTE_ACTIVE)


class Connector:
    """Keeps a connection open to another router or to a broker (meshbus.amqp.broker), reconnecting with
    back-off while it cannot."""

    def __init__(self, engine: Engine, config: ConnectorConfig) -> None:
        self.engine = engine
        self.config = config
        self.broker = config.role == "broker"
        address = f"{config.host}:{config.port}"
        self.where = f"broker {config.name} at {address}" if self.broker else f"connector to {address}"
        self.settings = ListenerConfig(
            host=config.host,
            port=config.port,
            role="inter-router" if config.role == "inter-router" else "normal",  # a broker: as a client
            cost=config.cost,
            idle_timeout=config.idle_timeout,
            max_frame_size=config.max_frame_size,
            link_capacity=config.link_capacity,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        where = self.where
        delay = RECONNECT_FIRST
        told = False  # an unreachable broker was logged at warning since it was last reached
        while True:
            lost = loop.create_future()

            def on_lost(lost: asyncio.Future[None] = lost) -> None:
                if not lost.done():
                    lost.set_result(None)

            try:
                await loop.create_connection(
                    lambda: cast(asyncio.Protocol, AmqpConnection(self.engine, self.settings, on_lost)),
                    self.config.host,
                    self.config.port,
                )
            except OSError as error:
                # An unreachable broker leaves its queues unserved: the operator is told once per outage.
                level = logging.WARNING if self.broker and not told else logging.DEBUG
                told = told or self.broker
                log.log(level, "%s: %s; retrying in %.2f s", where, error.strerror or error, delay)
            else:
                told = False
                log.info("%s: connected", where)
                started = loop.time()
                await lost
                log.log(
                    logging.WARNING if self.broker else logging.INFO,
                    "%s: connection lost; reconnecting",
                    where,
                )
                if loop.time() - started > RECONNECT_MAX:
                    delay = RECONNECT_FIRST
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, RECONNECT_MAX)
