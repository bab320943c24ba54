"""Queues served by external AMQP 1.0 brokers (issue 6): the router's links to each broker, on the connection
its connector (role "broker") keeps open, in place of the embedded store for the rules naming the broker.

Rules of this module:
1. It is the brokers' edge: it decides which links a broker connection carries (`_wanted`: plain code) and
   makes them with proton calls; forwarding, credit and outcomes are the core's (router/core.py), framing
   and the deliveries themselves the engine's: a broker link is an engine link like a client's.
2. Ingress: a queue address X of a broker's rule that gets an entry here (`serve`, as the store's) is
   consumed by a sender link to the broker's address of X (durable target), registered in the core as the
   store's link would be (`attach_store`): producers' deliveries reach the broker unsettled and the broker's
   outcome goes back to them, so a message is accepted only once the broker has it. `_store/<rule key>` is
   advertised, so the other routers of a mesh route X here.
3. Egress: while `_queue/<pool>/X` is reachable (its consumers, here or elsewhere), a receiver link from the
   broker's queue (durable source) is its producer in the core: the core's credit is the link's flow to the
   broker, consumers' outcomes are settled at the broker, `modified` as `released` (RabbitMQ 3.10 ends the
   session on `modified`). A broker queue is one group: each pool gets a receiver, and the pools of one
   queue share its messages (logged once per pool).
4. Connection loss: the engine drops the links (in-flight producers' deliveries come back modified, as for
   any consumer lost); once reconnected, the links wanted are attached again. A link or session the broker
   ends is logged with its condition; a link is attached again after RETRY seconds, a session's end closes
   the connection (the connector reconnects).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cproton_ffi import lib

from meshbus.amqp import pn
from meshbus.amqp.connection import AmqpConnection
from meshbus.amqp.interrouter import Connector
from meshbus.amqp.pn import CData
from meshbus.config import QueueConfig, RouterConfig
from meshbus.router.addressing import QueueRule
from meshbus.router.core import (
    MODIFIED_KIND,
    RELEASED,
    ConsumerLink,
    Delivery,
    Handle,
    Outcome,
    ProducerLink,
    parse_queue_address,
    store_address,
)

if TYPE_CHECKING:
    from meshbus.amqp.engine import Engine

log = logging.getLogger("meshbus.broker")

RETRY: Final = 2.0  # seconds before a link the broker refused or ended is attached again


@dataclass(eq=False, slots=True)
class Broker:
    """One broker: its connector, the rules it serves, and its links on the current connection."""

    name: str
    connector: Connector
    queues: dict[QueueRule, QueueConfig]
    conn: AmqpConnection | None = None  # open both ways
    session: CData = None
    served: dict[str, None] = field(default_factory=dict)  # its queue addresses with an entry here
    reachable: dict[str, None] = field(default_factory=dict)  # their _queue/ addresses with consumers
    intake: dict[str, CData] = field(default_factory=dict)  # queue address -> sender to the broker
    outlets: dict[str, CData] = field(default_factory=dict)  # _queue/<pool>/X -> receiver from the broker
    links: dict[CData, str] = field(default_factory=dict)  # each link above -> its router-side address
    attached: int = 0  # links attached on this connection: their names' serial numbers

    @property
    def where(self) -> str:
        return self.connector.where  # broker NAME at HOST:PORT


class BrokerHost:
    """The router's brokers: the core's QueueHost for their rules, and its Watcher for their queues' pools."""

    def __init__(self, engine: Engine, config: RouterConfig) -> None:
        self.engine = engine
        self.core = engine.core
        self.router_id = config.router.id
        brokered = config.brokered_queues()
        self.brokers: dict[str, Broker] = {}
        for connector in config.connector:
            if connector.role == "broker":
                assert connector.name is not None  # checked by the configuration
                queues = {rule: queue for rule, queue in brokered.items() if queue.broker == connector.name}
                self.brokers[connector.name] = Broker(connector.name, Connector(engine, connector), queues)
        self._by_rule = {rule: broker for broker in self.brokers.values() for rule in broker.queues}
        self._shared_pools: set[str] = set()  # named pools told they share a broker queue (logged once)
        self.edge = _BrokerEdge(engine)

    def start(self) -> None:
        """Be the engine's broker edge and the core's watcher; advertise the rules; connect."""
        self.engine.broker = self
        self.core.watchers.append(self)
        for rule in sorted(self._by_rule, key=lambda r: r.key):
            # Never given credit: the link only makes the mesh route the rule's queues to this router.
            self.core.attach_store(store_address(rule), store_address(rule), self.engine)
        for broker in self.brokers.values():
            rules = ", ".join(sorted(rule.key for rule in broker.queues)) or "no queue rule names it"
            log.info("%s serves queues of %s", broker.where, rules)
            broker.connector.start()

    def stop(self) -> None:
        for broker in self.brokers.values():
            broker.connector.stop()

    def _broker_of(self, address: str) -> Broker | None:
        """The broker serving a queue address."""
        rule = self.core.queues.lookup(address)
        return None if rule is None else self._by_rule.get(rule)

    # -- QueueHost -----------------------------------------------------------------------------------

    def hosts(self, rule: QueueRule) -> bool:
        return rule in self._by_rule

    def serve(self, address: str) -> None:
        broker = self._broker_of(address)
        if broker is not None:
            broker.served[address] = None
            self._sync(broker)

    # -- Watcher -------------------------------------------------------------------------------------

    def local_consumers(self, address: str, present: bool) -> None:
        pass  # the mesh's concern

    def reachable(self, address: str, present: bool) -> None:
        parsed = parse_queue_address(address)
        broker = None if parsed is None else self._broker_of(parsed[1])
        if parsed is None or broker is None:
            return
        if not present:
            broker.reachable.pop(address, None)
            self._detach_outlet(broker, address)
            return
        broker.reachable[address] = None
        pool, queue = parsed
        if pool is not None and address not in self._shared_pools:
            self._shared_pools.add(address)
            log.warning(
                "pool %r of queue %r shares the messages of %s's queue with the queue's other consumers (a "
                "broker queue is one group: each message goes to one pool)",
                pool,
                queue,
                broker.where,
            )
        self._sync(broker)

    # -- the links a broker connection carries -------------------------------------------------------

    def _sync(self, broker: Broker) -> None:
        """Attach each link the broker's connection should carry and does not."""
        conn = broker.conn
        if conn is None or conn.freed:
            return
        intake, outlets = _wanted(broker, self.core.entries)
        for address in intake:
            self._attach_intake(broker, conn, address)
        for address in outlets:
            self._attach_outlet(broker, conn, address)
        self.engine.mark(conn)

    def _attach_intake(self, broker: Broker, conn: AmqpConnection, address: str) -> None:
        queue = broker.queues[self._rule(address)]
        sender = self._open(
            broker, broker.session, address, sender=True, remote=queue.broker_address(address)
        )
        broker.intake[address] = sender
        self.engine.track(sender, self.core.attach_store(sender, address, self.engine, conn))

    def _attach_outlet(self, broker: Broker, conn: AmqpConnection, address: str) -> None:
        parsed = parse_queue_address(address)
        assert parsed is not None
        queue = broker.queues[self._rule(parsed[1])]
        # A session of its own: RabbitMQ 3.10 never completes the detach of a link it sends on, and keeps
        # what it had sent on it until its session ends (then it takes it back).
        session = lib.pn_session(conn.connection)
        lib.pn_session_open(session)
        receiver = self._open(broker, session, address, sender=False, remote=queue.broker_address(parsed[1]))
        broker.outlets[address] = receiver
        capacity = broker.connector.config.link_capacity
        link = self.core.attach_producer(receiver, address, capacity, conn, edge=self.edge)
        self.engine.track(receiver, link)

    def _rule(self, address: str) -> QueueRule:
        rule = self.core.queues.lookup(address)
        assert rule is not None
        return rule

    def _open(self, broker: Broker, session: CData, address: str, *, sender: bool, remote: str) -> CData:
        """A link of ours on the broker's connection: its terminus on the broker's side is `remote`,
        durable (RabbitMQ ends the session of a non-durable link to a durable queue)."""
        broker.attached += 1
        name = f"meshbus-{self.router_id}-{broker.attached}-{address}".encode()
        link = (lib.pn_sender if sender else lib.pn_receiver)(session, name)
        theirs, ours = (
            (lib.pn_link_target(link), lib.pn_link_source(link))
            if sender
            else (lib.pn_link_source(link), lib.pn_link_target(link))
        )
        lib.pn_terminus_set_address(theirs, remote.encode())
        lib.pn_terminus_set_durability(theirs, lib.PN_CONFIGURATION)
        lib.pn_terminus_set_address(ours, address.encode())
        lib.pn_link_open(link)
        broker.links[link] = address
        return link

    def _detach_outlet(self, broker: Broker, address: str) -> None:
        receiver = broker.outlets.pop(address, None)
        if receiver is None:
            return
        broker.links.pop(receiver, None)
        link = self.engine.links.pop(receiver, None)
        if isinstance(link, ProducerLink):
            link.owner.links.discard(receiver)
            self.core.detach_producer(link)
        lib.pn_session_close(lib.pn_link_session(receiver))  # the broker takes back what nobody settled
        if broker.conn is not None:
            self.engine.mark(broker.conn)

    # -- the engine's events on broker connections ---------------------------------------------------

    def _broker_on(self, conn: AmqpConnection) -> Broker | None:
        return next((b for b in self.brokers.values() if b.connector.settings is conn.listener), None)

    def connection_opened(self, conn: AmqpConnection) -> None:
        broker = self._broker_on(conn)
        if broker is None:
            return
        log.info("%s: connection open (container %s)", broker.where, conn.container)
        broker.conn = conn
        broker.session = lib.pn_session(conn.connection)
        lib.pn_session_open(broker.session)
        self._sync(broker)

    def link_opened(self, conn: AmqpConnection, link: CData) -> None:
        """The broker answered an attach of ours, or attached a link of its own (refused: it has no use)."""
        if lib.pn_link_state(link) & lib.PN_LOCAL_UNINIT:
            pn.set_condition(
                lib.pn_link_condition(link), "amqp:not-allowed", "the router attaches no links here"
            )
            lib.pn_link_open(link)
            lib.pn_link_close(link)

    def link_closed(self, conn: AmqpConnection, link: CData) -> None:
        """The broker ended a link of ours (it refused the attach, or the queue went): tried again later."""
        broker = self._broker_on(conn)
        address = None if broker is None else broker.links.pop(link, None)
        if broker is None or address is None:
            return
        broker.intake.pop(address, None)
        broker.outlets.pop(address, None)
        error = pn.condition(lib.pn_link_remote_condition(link))
        log.error(
            "%s ended the link for %r: %s; attaching it again in %.0f s (check the queue on the broker)",
            broker.where,
            address,
            f"{error[0]}: {error[1]}" if error else "no error given",
            RETRY,
        )
        asyncio.get_running_loop().call_later(RETRY, self._sync, broker)

    def session_closed(self, conn: AmqpConnection, session: CData) -> None:
        """The broker ended our session (RabbitMQ does on an outcome or terminus it refuses): reconnect."""
        broker = self._broker_on(conn)
        if broker is None or conn.freed or lib.pn_session_state(session) & lib.PN_LOCAL_CLOSED:
            return  # an outlet's session that the router ended
        error = pn.condition(lib.pn_session_remote_condition(session))
        reason = f"{error[0]}: {error[1]}" if error else "no error given"
        log.error("%s ended the router's session: %s; reconnecting", broker.where, reason)
        self.engine.abort(conn, "amqp:session:unattached", f"broker ended the session: {reason}")

    def connection_lost(self, conn: AmqpConnection) -> None:
        """The engine has dropped the connection's links: none is attached any more."""
        broker = self._broker_on(conn)
        if broker is None or broker.conn is not conn:
            return
        broker.conn = broker.session = None
        broker.intake.clear()
        broker.outlets.clear()
        broker.links.clear()
        # Queue addresses whose entry went while the broker was away need no link when it is back.
        broker.served = {address: None for address in broker.served if address in self.core.entries}


def _wanted(broker: Broker, entries: Container[str]) -> tuple[list[str], list[str]]:
    """The links the broker's connection should carry and does not: intake for its queue addresses that
    still have an entry here, outlets for its `_queue/` addresses with consumers."""
    intake = [address for address in broker.served if address in entries and address not in broker.intake]
    outlets = [address for address in broker.reachable if address not in broker.outlets]
    return intake, outlets


class _BrokerEdge:
    """The engine as the Edge of the receivers from brokers: `modified` is settled as `released` (RabbitMQ
    3.10 knows accepted, rejected and released only); states before the outcome are not sent."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def send(self, link: ConsumerLink, delivery: Delivery) -> Handle:
        return self.engine.send(link, delivery)

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.engine.settle(delivery, RELEASED if outcome.kind == MODIFIED_KIND else outcome)

    def update(self, delivery: Delivery, outcome: Outcome) -> None:
        pass

    def flow(self, link: ProducerLink, credit: int) -> None:
        self.engine.flow(link, credit)

    def withdraw_credit(self, link: ProducerLink) -> None:
        self.engine.withdraw_credit(link)

    def drained(self, link: ConsumerLink) -> None:
        self.engine.drained(link)
