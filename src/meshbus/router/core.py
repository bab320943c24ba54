"""The forwarding core: address table, links, deliveries, credit, settlement and expiry.

Rules of this module:
1. It makes every forwarding decision: which consumer gets a delivery, when a producer gets credit, which
   outcome goes back to a producer. It never touches proton, sockets, threads or a clock.
2. Events come in as method calls from the edge (`attach_consumer`, `deliver`, `consumer_outcome`, ...);
   actions go out through the narrow `Edge` protocol of each link: the protocol edge implements it with
   proton calls for the links of AMQP connections; an in-process endpoint (the store) for its own links.
3. Payloads are opaque bytes, forwarded unchanged. Time arrives as `now` (seconds since the epoch, since
   message expiry times are wall-clock times).
4. Memory bound: a producer's link is given credit only for deliveries that have left the router, so the
   router holds at most `capacity` not-yet-forwarded deliveries per producer link, whatever the consumers do.
5. Pools: a consumer may name a pool. On a balanced or closest address the consumers form one group per pool
   (those without a pool, one more) and each message goes to one consumer of every group, its copies' outcomes
   combined for the producer as for multicast. While an address's consumers all share one group (the common
   case) delivering costs no more than without pools. Multicast addresses ignore pools.
6. Mesh: other routers are reached through router links (one outgoing data link per neighbour, a
   ConsumerLink with `router` set). The mesh tells the core which other routers have consumers per address
   (`remote_changed`) and the paths (`set_routes`). Closest prefers a local consumer, then the lowest-cost
   router; balanced weighs local consumers' unsettled and queued deliveries (those with credit first)
   against each router's unsettled plus path cost, and sends elsewhere what no consumer here can take now.
   What waits for a consumer that drains its credit goes to the others of its group (`_hand_on`);
   multicast copies to local consumers and down the source's tree. A delivery records where it
   entered the mesh (`ingress`) and the routers it passed (`trace`): it is never sent to a router in its
   trace, and goes no further than MAX_HOPS routers. Dynamic addresses name their router
   (`_dynamic/<router id>/...`) and are reached through it. Pools are honoured among one router's consumers;
   across routers, an address's consumers elsewhere form one more group.
7. Flow across the mesh, so that a slow consumer on one router never stalls a link between routers: a
   delivery arriving from another router moves on at once (the link between routers always gets its
   credit back), and an unsettled delivery that entered the mesh here occupies its producer's credit until
   its outcome comes back. Memory anywhere in the mesh is so bounded by the producers' capacities; for
   pre-settled deliveries from another router (no outcome comes back), by PRESETTLED_QUEUE_LIMIT per
   consumer: beyond it they are dropped and counted.
8. Queues (issue 6): the queue rules say which addresses are durable queues. On a router hosting a store
   for the rule (`queue_host`: its store, or an external broker, or both as `QueueHosts`, each serving its
   own rules), the store's endpoint consumes from a queue address X through a link of its
   own, attached when X's entry is created, so producers' deliveries take the normal path to the store.
   Elsewhere X's remote routers are those advertising `_store/<rule key>` (the stores of the mesh). A
   client's receiving link on X with pool P joins the internal address `_queue/<P>/X` (see
   `queue_address`), whose producer is the store's endpoint wherever the address is reachable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Protocol
from urllib.parse import quote, unquote

from meshbus.mesh.path import Route
from meshbus.router.addressing import Distribution, DistributionRules, QueueRule, QueueRules

# The most routers a delivery may pass; beyond, it is released (a routing loop while the mesh converges).
MAX_HOPS: Final = 32
DYNAMIC_PREFIX: Final = "_dynamic/"
# A consumer's queue holds at most this many pre-settled deliveries that came from another router (rule 7).
PRESETTLED_QUEUE_LIMIT: Final = 1000
MESH_PREFIX: Final = "_mesh/"  # the routers' own links: never in the address table

# The edge's reference to a proton link or delivery: opaque to the core, used as a dictionary key.
Handle = Any

# Outcome kinds carry the AMQP 1.0 descriptor codes of the delivery states (also proton's PN_* values).
ACCEPTED_KIND: Final = 0x24
REJECTED_KIND: Final = 0x25
RELEASED_KIND: Final = 0x26
MODIFIED_KIND: Final = 0x27


@dataclass(frozen=True, slots=True)
class Outcome:
    """A terminal delivery state as it travels from a consumer back to a producer."""

    kind: int
    error: tuple[str, str] | None = None  # (condition name, description) of a rejection
    delivery_failed: bool = False
    undeliverable_here: bool = False


ACCEPTED: Final = Outcome(ACCEPTED_KIND)
RELEASED: Final = Outcome(RELEASED_KIND)
# A consumer went away without settling: the producer may resend (delivery-failed raises its count).
CONSUMER_LOST: Final = Outcome(MODIFIED_KIND, delivery_failed=True)
EXPIRED: Final = Outcome(MODIFIED_KIND, undeliverable_here=True)


def rejected(condition: str, description: str) -> Outcome:
    return Outcome(REJECTED_KIND, error=(condition, description))


class AttachError(Exception):
    """An attach the router refuses; `condition` is the AMQP error condition sent in the detach."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description


class Edge(Protocol):
    """What the core asks of the protocol edge."""

    def send(self, link: ConsumerLink, delivery: Delivery) -> Handle:
        """Start the delivery on the consumer's link with the payload received so far; return its handle."""

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Settle the producer's delivery with this outcome."""

    def update(self, delivery: Delivery, outcome: Outcome) -> None:
        """Tell the producer the consumer's (not yet settled) state of the delivery."""

    def flow(self, link: ProducerLink, credit: int) -> None:
        """Give the producer's link this much more credit."""

    def withdraw_credit(self, link: ProducerLink) -> None:
        """Ask the producer to give up its remaining credit (drain)."""

    def drained(self, link: ConsumerLink) -> None:
        """Spend the consumer's remaining credit: nothing more to send on a draining link."""


QUEUE_PREFIX: Final = "_queue/"  # _queue/<pool>/<queue address>: a pool's consumers of a queue
STORE_PREFIX: Final = "_store/"  # _store/<rule key>: consumed by the routers storing the rule's queues
_DEFAULT_POOL: Final = "-"  # the group of consumers naming no pool; a named pool is written "+<pool>"


def queue_address(pool: str | None, address: str) -> str:
    """The internal address of a pool's consumers of a queue: `_queue/-/X` for the default group,
    `_queue/+<pool, percent-encoded>/X` for a named one (so any pool name, '/' included, maps one way)."""
    encoded = _DEFAULT_POOL if pool is None else "+" + quote(pool, safe="")
    return f"{QUEUE_PREFIX}{encoded}/{address}"


def parse_queue_address(internal: str) -> tuple[str | None, str] | None:
    """(pool, queue address) of an internal `_queue/` address; None for any other address."""
    if not internal.startswith(QUEUE_PREFIX):
        return None
    encoded, _, address = internal[len(QUEUE_PREFIX) :].partition("/")
    if encoded == _DEFAULT_POOL:
        return None, address
    return unquote(encoded[1:]), address


def store_address(rule: QueueRule) -> str:
    return STORE_PREFIX + rule.key


class QueueHost(Protocol):
    """The store of this router, as far as the core needs it."""

    def hosts(self, rule: QueueRule) -> bool:
        """This router stores the queues of the rule."""

    def serve(self, address: str) -> None:
        """The queue address just got its entry here: attach the store's consumer on it."""


class QueueHosts:
    """The queue hosts of one router (its store, its brokers) as one: each rule is served by the first host
    that hosts it."""

    def __init__(self, rules: QueueRules, hosts: list[QueueHost]) -> None:
        self._rules = rules
        self._hosts = hosts

    def _host(self, rule: QueueRule) -> QueueHost | None:
        return next((host for host in self._hosts if host.hosts(rule)), None)

    def hosts(self, rule: QueueRule) -> bool:
        return self._host(rule) is not None

    def serve(self, address: str) -> None:
        rule = self._rules.lookup(address)
        host = None if rule is None else self._host(rule)
        assert host is not None, f"no queue host serves {address!r}"
        host.serve(address)


class Watcher(Protocol):
    """Who follows which addresses have consumers: the mesh (local ones, to advertise them) and the store
    (any, to serve a queue's consumers wherever they are)."""

    def local_consumers(self, address: str, present: bool) -> None:
        """The address gained its first consumer on this router (present) or lost its last."""

    def reachable(self, address: str, present: bool) -> None:
        """The address gained its first consumer anywhere, here or on another router, or lost its last."""


@dataclass(slots=True, eq=False)
class ConsumerGroup:
    """Consumers sharing the messages of an address: each message goes to one of them."""

    pool: str | None
    consumers: list[ConsumerLink]
    rotation: int = 0  # tie-breaker: consumers take turns


@dataclass(slots=True, eq=False)
class AddressEntry:
    """One address with its consumers and the producers' links targeting it.

    While the consumers all share one group (they name the same pool, or none), `group` is that group and its
    list is `consumers` itself; once they split, `group` is None and `pools` holds a group per pool."""

    address: str
    distribution: Distribution
    consumers: list[ConsumerLink] = field(default_factory=list)
    producers: list[ProducerLink] = field(default_factory=list)
    group: ConsumerGroup | None = None
    pools: list[ConsumerGroup] = field(default_factory=list)
    remote: frozenset[str] = frozenset()  # the other routers with consumers (the mesh's view)
    toward: dict[str, int] = field(default_factory=dict)  # other router -> unsettled deliveries sent to it

    def __post_init__(self) -> None:
        self.group = ConsumerGroup(None, self.consumers)

    @property
    def reachable(self) -> bool:
        """Some consumer, here or on another router, may receive what is sent to the address."""
        return bool(self.consumers or self.remote)


@dataclass(slots=True, eq=False)
class ProducerLink:
    """A link on which a client sends to the router. `address` None: anonymous relay (route by `to`)."""

    handle: Handle
    address: str | None
    capacity: int
    edge: Edge
    owner: Any = None  # the edge's object for the link's connection, opaque to the core
    entry: AddressEntry | None = None
    credit: int = 0  # credit issued and not yet used, as far as the core knows
    held: int = 0  # deliveries received and not yet forwarded or settled
    inflight: dict[Handle, Delivery] = field(default_factory=dict)  # unsettled, by the edge's handle
    closed: bool = False
    from_router: bool = False  # another router's data link: its deliveries move on at once (rule 7)


@dataclass(slots=True, eq=False)
class ConsumerLink:
    """A link on which the router sends to a client."""

    handle: Handle
    address: str
    entry: AddressEntry
    edge: Edge
    owner: Any = None  # the edge's object for the link's connection, opaque to the core
    settle_on_send: bool = False  # the consumer asked for pre-settled deliveries
    pool: str | None = None  # the pool it shares messages within (None on multicast addresses)
    credit: int = 0
    drain: bool = False
    blocked: bool = False  # the edge cannot take more now (a slow socket)
    router: str | None = None  # a router link: the neighbour it leads to
    streaming: Delivery | None = None  # a multi-frame delivery in progress holds the link
    queue: deque[Delivery] = field(default_factory=deque)
    inflight: dict[Handle, Delivery] = field(default_factory=dict)  # sent, unsettled, by handle
    delivered: int = 0
    closed: bool = False

    @property
    def load(self) -> int:
        return len(self.inflight) + len(self.queue)

    def can_take(self) -> bool:
        """A delivery offered now would go out now, not wait in the queue."""
        return self.credit > 0 and not self.queue and not self.blocked and self.streaming is None


class Delivery:
    """A message passing through the router: from one producer link to one or more consumer links.

    A plain class, not a dataclass: one is made per message, and mypyc compiles an `__init__` written out
    (a dataclass's generated one runs interpreted, about a microsecond per message)."""

    __slots__ = (
        "aborted",
        "accepted",
        "address",
        "complete",
        "deadline",
        "dest",
        "gathering",
        "handle",
        "held",
        "ingress",
        "link",
        "moved_on",
        "payload",
        "pending",
        "queued",
        "refusal",
        "settled",
        "toward",
        "trace",
        "unicast",
    )

    def __init__(
        self,
        link: ProducerLink,
        handle: Handle,
        payload: bytes | bytearray,
        complete: bool,
        settled: bool,
        deadline: float | None,
    ) -> None:
        self.link = link
        self.handle = handle
        self.payload = payload
        self.complete = complete
        self.settled = settled  # settled by the producer: nothing goes back
        self.deadline = deadline  # expiry, seconds since the epoch
        self.address = ""
        self.pending = 0  # copies neither settled by a consumer nor given up
        self.queued = 0  # copies waiting in consumers' queues (the payload must be kept whole for them)
        self.accepted = False
        self.refusal: Outcome | None = None  # for a delivery copied to several consumers: the first rejection
        self.unicast = True  # one copy: the consumer's outcome is the producer's
        self.moved_on = False  # no longer counted against the producer's credit
        self.aborted = False
        self.ingress: str | None = None  # the router where it entered the mesh (None: this one)
        self.trace: tuple[str, ...] = ()  # the routers it passed before this one
        self.toward: str | None = None  # the other router a unicast copy was sent to (balanced accounting)
        self.held = False  # sent on to another router: occupies its producer's credit until settled (rule 7)
        self.gathering = False  # an in-process consumer (the store) needs it whole: the edge keeps all frames
        self.dest: str | None = None  # the router it is sent toward, chosen where it entered the mesh

    def __repr__(self) -> str:
        return f"Delivery({self.address!r}, {len(self.payload)} bytes, pending={self.pending})"


@dataclass(slots=True)
class Counters:
    """What the router did with deliveries, for its operator (logged at exit until management comes)."""

    delivered: int = 0
    released_no_consumer: int = 0
    dropped_no_consumer: int = 0
    dropped_slow_consumer: int = 0  # pre-settled, from another router, past PRESETTLED_QUEUE_LIMIT (rule 7)
    expired: int = 0
    rejected: int = 0

    def __str__(self) -> str:
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self))


class RouterCore:
    """The address table and the forwarding rules of one router."""

    def __init__(
        self,
        edge: Edge,
        rules: DistributionRules,
        router_id: str,
        instance: str,
        queues: QueueRules | None = None,
    ) -> None:
        self._edge = edge
        self._rules = rules
        self.router_id = router_id
        self._dynamic_prefix = f"{DYNAMIC_PREFIX}{router_id}/{instance}."
        self.queues = queues or QueueRules(())
        self.queue_host: QueueHost | None = None
        self._stores: dict[str, frozenset[str]] = {}  # rule key -> the other routers storing its queues
        # rule key -> the queue addresses of the rule with an entry here, stored by other routers
        self._stored_elsewhere: dict[str, dict[str, None]] = {}
        self._dynamic_count = 0
        self.entries: dict[str, AddressEntry] = {}
        self.counters = Counters()
        self._expiring: set[ConsumerLink] = set()
        self.watchers: list[Watcher] = []
        self.routes: Mapping[str, Route] = {}  # other reachable router -> cost and next hops
        self.multicast: Mapping[str, frozenset[str]] = {}  # source router -> neighbours on its tree
        self.router_links: dict[str, list[ConsumerLink]] = {}  # neighbour -> data links to it
        self._remote_dynamic: set[str] = set()  # entries for other routers' dynamic addresses

    # -- attach and detach -------------------------------------------------------------------------

    def _entry(self, address: str, distribution: Distribution | None = None) -> AddressEntry:
        entry = self.entries.get(address)
        if entry is None:
            if address.startswith(MESH_PREFIX):
                raise AttachError("amqp:not-allowed", f"addresses under {MESH_PREFIX} are the routers' own")
            rule = None
            router = _dynamic_router(address)
            if router is not None:  # made by a router, whatever the rules say: its consumer is one link
                distribution = Distribution.CLOSEST
            elif address.startswith((QUEUE_PREFIX, STORE_PREFIX)):  # the stores' own, whatever the rules say
                distribution = Distribution.BALANCED
            elif distribution is None:
                distribution = self._rules.lookup(address)
                rule = self.queues.lookup(address)
            if distribution is Distribution.UNAVAILABLE:
                raise AttachError("amqp:not-found", f"address {address!r} is configured unavailable")
            if rule is not None:
                distribution = Distribution.BALANCED  # one consumer, the store: each message once
            entry = AddressEntry(address, distribution)
            self.entries[address] = entry
            if rule is not None:
                self._queue_created(entry, rule)
            if router is not None and router != self.router_id:
                # Another router's dynamic address: reached through that router while it is reachable.
                self._remote_dynamic.add(address)
                if router in self.routes:
                    self.remote_changed(address, frozenset((router,)))
        return entry

    def _queue_created(self, entry: AddressEntry, rule: QueueRule) -> None:
        """A queue address got its entry: the store here takes it, or the stores of the mesh do."""
        host = self.queue_host
        if host is not None and host.hosts(rule):
            host.serve(entry.address)
            return
        self._stored_elsewhere.setdefault(rule.key, {})[entry.address] = None
        stores = self._stores.get(rule.key)
        if stores:
            self._set_remote(entry, stores)

    def _forget_if_unused(self, entry: AddressEntry) -> None:
        if entry.consumers or entry.producers or entry.remote:
            return
        self._remote_dynamic.discard(entry.address)
        if self.entries.pop(entry.address, None) is not None and self._stored_elsewhere:
            rule = self.queues.lookup(entry.address)
            if rule is not None:
                self._stored_elsewhere.get(rule.key, {}).pop(entry.address, None)

    def _gained_consumers(self, entry: AddressEntry, local: bool) -> None:
        """The address's first local consumer (local) or first remote router arrived."""
        for watcher in self.watchers:
            if local:
                watcher.local_consumers(entry.address, True)
            if not (entry.remote if local else entry.consumers):
                watcher.reachable(entry.address, True)
        if not (entry.remote if local else entry.consumers):
            for producer in entry.producers:
                self._replenish(producer)

    def _lost_consumers(self, entry: AddressEntry, local: bool) -> None:
        """The address's last local consumer (local) or last remote router went."""
        for watcher in self.watchers:
            if local:
                watcher.local_consumers(entry.address, False)
            if not entry.reachable:
                watcher.reachable(entry.address, False)
        if not entry.reachable:
            for producer in entry.producers:
                producer.credit = 0
                producer.edge.withdraw_credit(producer)

    def remote_changed(self, address: str, routers: frozenset[str]) -> None:
        """The mesh's view: these other routers have consumers for the address (none: no other router)."""
        if address.startswith(STORE_PREFIX):
            self._stores_changed(address[len(STORE_PREFIX) :], routers)
        elif self.queues.lookup(address) is not None:
            # A queue: its remote routers are those storing its rule, or none where it is stored here (the
            # store that takes a message keeps it).
            return
        entry = self.entries.get(address)
        if entry is None:
            if not routers:
                return
            try:
                entry = self._entry(address)
            except AttachError:  # unavailable here: nothing is sent to it from here
                return
        self._set_remote(entry, routers)

    def _stores_changed(self, key: str, routers: frozenset[str]) -> None:
        """The routers storing the queues of rule `key` changed: they are its queues' remote routers."""
        if routers:
            self._stores[key] = routers
        else:
            self._stores.pop(key, None)
        for address in list(self._stored_elsewhere.get(key, ())):
            entry = self.entries.get(address)
            if entry is not None:
                self._set_remote(entry, routers)

    def _set_remote(self, entry: AddressEntry, routers: frozenset[str]) -> None:
        before, entry.remote = entry.remote, routers
        if routers and not before:
            self._gained_consumers(entry, local=False)
        elif before and not routers:
            self._lost_consumers(entry, local=False)
            self._forget_if_unused(entry)

    def dynamic_address(self) -> str:
        self._dynamic_count += 1
        return f"{self._dynamic_prefix}{self._dynamic_count}"

    def attach_consumer(
        self,
        handle: Handle,
        address: str | None,
        settle_on_send: bool = False,
        owner: Any = None,
        *,
        pool: str | None = None,
        edge: Edge | None = None,
    ) -> ConsumerLink:
        """A client attached a receiving link. `address` None asks for a dynamic address; `pool` names the
        group of consumers it shares messages with (ignored on a multicast address: the link's pool is then
        None). On a queue address the link joins its pool's internal address (`queue_address`), where
        every consumer is of that pool: the link's pool is then None and its address the internal one."""
        if address is None:
            entry = self._entry(self.dynamic_address(), Distribution.CLOSEST)
        elif self.queues.lookup(address) is not None:
            if self._rules.lookup(address) is Distribution.UNAVAILABLE:
                raise AttachError("amqp:not-found", f"address {address!r} is configured unavailable")
            entry = self._entry(queue_address(pool, address), Distribution.BALANCED)
            pool = None
        else:
            entry = self._entry(address)
        if entry.distribution is Distribution.MULTICAST:
            pool = None
        return self._add_consumer(
            ConsumerLink(handle, entry.address, entry, edge or self._edge, owner, settle_on_send, pool)
        )

    def attach_store(self, handle: Handle, address: str, edge: Edge, owner: Any = None) -> ConsumerLink:
        """The store's own receiving link on a queue address (or on `_store/<rule key>`): on the address
        itself, where a client's link on a queue address joins its pool's internal address. (A broker's
        link is one too, on the broker's connection: `owner`.)"""
        entry = self._entry(address)
        return self._add_consumer(ConsumerLink(handle, entry.address, entry, edge, owner))

    def _add_consumer(self, link: ConsumerLink) -> ConsumerLink:
        entry = link.entry
        entry.consumers.append(link)
        self._join_group(entry, link)
        if len(entry.consumers) == 1:
            self._gained_consumers(entry, local=True)
        return link

    def _join_group(self, entry: AddressEntry, link: ConsumerLink) -> None:
        """File a new consumer, already among the address's consumers, with the others of its pool."""
        shared = entry.group
        if shared is not None:
            if len(entry.consumers) == 1:
                shared.pool = link.pool  # the first consumer names the group
                return
            if link.pool == shared.pool:
                return
            # The consumers split: each group gets a list of its own; `consumers` keeps every consumer.
            entry.group = None
            entry.pools = [ConsumerGroup(shared.pool, entry.consumers[:-1], shared.rotation)]
        for group in entry.pools:
            if group.pool == link.pool:
                group.consumers.append(link)
                return
        entry.pools.append(ConsumerGroup(link.pool, [link]))

    def _leave_group(self, entry: AddressEntry, link: ConsumerLink) -> ConsumerGroup | None:
        """Take a leaving consumer, already out of the address's consumers, from its group; return the
        group if consumers remain in it."""
        if entry.group is not None:
            return entry.group if entry.consumers else None
        (group,) = [group for group in entry.pools if group.pool == link.pool]
        group.consumers.remove(link)
        if group.consumers:
            return group
        entry.pools.remove(group)
        if len(entry.pools) == 1:  # one group left: its list is `consumers` again
            (last,) = entry.pools
            entry.pools = []
            entry.group = ConsumerGroup(last.pool, entry.consumers, last.rotation)
        return None

    def attach_producer(
        self,
        handle: Handle,
        address: str | None,
        capacity: int,
        owner: Any = None,
        dynamic: bool = False,
        *,
        edge: Edge | None = None,
        from_router: bool = False,
    ) -> ProducerLink:
        """A client attached a sending link; `address` None is an anonymous-relay link, `dynamic` asks
        for an address of the router's making."""
        if dynamic:
            entry: AddressEntry | None = self._entry(self.dynamic_address(), Distribution.CLOSEST)
        else:
            entry = None if address is None else self._entry(address)
        link = ProducerLink(
            handle,
            entry.address if entry else None,
            capacity,
            edge or self._edge,
            owner,
            entry,
            from_router=from_router,
        )
        if entry is not None:
            entry.producers.append(link)
        self._replenish(link)
        return link

    def detach_producer(self, link: ProducerLink) -> None:
        link.closed = True
        # Deliveries still on their way carry on, but nothing can be said to this producer any more.
        for delivery in link.inflight.values():
            delivery.settled = True
        link.inflight.clear()
        if link.entry is not None:
            link.entry.producers.remove(link)
            self._forget_if_unused(link.entry)

    def detach_consumer(self, link: ConsumerLink, now: float) -> None:
        link.closed = True
        entry = link.entry
        entry.consumers.remove(link)
        if link.router is not None:
            links = self.router_links[link.router]
            links.remove(link)
            if not links:
                del self.router_links[link.router]
        # Where its queued deliveries may go instead (on a multicast address, the others have their copies).
        multicast = entry.distribution is Distribution.MULTICAST
        mates = None if multicast else self._leave_group(entry, link)
        # Sent but unsettled: the outcome is unknown, so the producer is told to resend.
        for delivery in list(link.inflight.values()):
            self._copy_settled(delivery, CONSUMER_LOST)
        link.inflight.clear()
        # A delivery still streaming to it is among the unsettled ones above (or was pre-settled).
        link.streaming = None
        distribution = entry.distribution
        self._pass_on(link, now, None if mates is None else lambda: self._choose(mates, distribution))
        if not entry.consumers and link.router is None:
            self._lost_consumers(entry, local=True)
        self._forget_if_unused(entry)

    # -- credit --------------------------------------------------------------------------------------

    def _replenish(self, link: ProducerLink) -> None:
        if link.closed or (link.entry is not None and not link.entry.reachable):
            return
        grant = link.capacity - link.held - link.credit
        if grant > 0:
            link.credit += grant
            link.edge.flow(link, grant)

    def refused_arrival(self, link: ProducerLink) -> None:
        """The edge refused a delivery before routing it (too large): it used one credit."""
        if link.credit > 0:
            link.credit -= 1
        self._replenish(link)

    def consumer_credit(self, link: ConsumerLink, credit: int, drain: bool, now: float) -> None:
        """A consumer's flow: its credit now and whether it asks us to drain."""
        link.credit = credit
        link.drain = drain
        self._pump(link, now)
        if (
            drain
            and link.queue
            and link.router is None
            and link.entry.distribution is not Distribution.MULTICAST
        ):
            self._hand_on(link, now)

    def _hand_on(self, link: ConsumerLink, now: float) -> None:
        """A consumer drained its credit with deliveries still waiting for it (a server that stops does, and
        may work a long time before it detaches): they go to the other consumers of its group that are not
        draining too, those able to take them now first, then the least loaded. A multicast copy is this
        consumer's own; a router link never drains."""
        entry = link.entry
        group = entry.group
        if group is None:
            (group,) = [pool for pool in entry.pools if pool.pool == link.pool]
        others = [consumer for consumer in group.consumers if consumer is not link and not consumer.drain]
        if others:
            self._pass_on(
                link, now, lambda: min(others, key=lambda other: (not other.can_take(), other.load))
            )

    def _pass_on(self, link: ConsumerLink, now: float, taker: Callable[[], ConsumerLink] | None) -> None:
        """Empty the consumer's queue: each delivery expires, or is offered to `taker()`, or (no taker, or
        its producer aborted it) is released."""
        queued, link.queue = link.queue, deque()
        self._expiring.discard(link)
        for delivery in queued:
            delivery.queued -= 1
            if delivery.deadline is not None and delivery.deadline <= now:
                self._expire_copy(delivery)
            elif taker is not None and not delivery.aborted:
                self._offer(taker(), delivery)
            else:
                self._copy_settled(delivery, RELEASED)
            if not delivery.queued:
                self._move_on(delivery)

    def unblock(self, link: ConsumerLink, now: float) -> None:
        link.blocked = False
        self._pump(link, now)

    def _pump(self, link: ConsumerLink, now: float) -> None:
        queue = link.queue
        while queue and link.credit > 0 and not link.blocked and link.streaming is None:
            delivery = queue.popleft()
            delivery.queued -= 1
            if delivery.deadline is not None and delivery.deadline <= now:
                self._expire_copy(delivery)
            else:
                self._send(link, delivery)
            if not delivery.queued:
                self._move_on(delivery)
        if not queue:
            self._expiring.discard(link)
            self._answer_drain(link)

    def _answer_drain(self, link: ConsumerLink) -> None:
        """A draining consumer whose queue is empty gets its remaining credit spent."""
        if link.drain and link.credit > 0 and not link.queue and link.streaming is None:
            link.credit = 0
            link.edge.drained(link)

    # -- deliveries ----------------------------------------------------------------------------------

    def deliver(
        self,
        link: ProducerLink,
        handle: Handle,
        payload: bytes | bytearray,
        *,
        complete: bool,
        settled: bool,
        to: str | None,
        deadline: float | None,
        now: float,
        ingress: str | None = None,
        trace: tuple[str, ...] = (),
        dest: str | None = None,
    ) -> Delivery:
        """A new delivery arrived (the first frame of it, if `complete` is false). From another router, it
        comes with the router where it entered the mesh, the routers it passed and maybe the router it is
        sent toward (`dest`), which a router on the way follows by its routes alone: it may not know the
        address yet (it just joined the mesh)."""
        if link.credit > 0:
            link.credit -= 1
        link.held += 1
        delivery = Delivery(link, handle, payload, complete, settled, deadline)
        if ingress is not None:
            delivery.ingress = ingress
            delivery.trace = trace
        if not settled:
            link.inflight[handle] = delivery
        entry = link.entry
        if entry is None:
            if to is None:
                self.counters.rejected += 1
                self._finish(delivery, rejected("amqp:precondition-failed", "message has no 'to' address"))
                return delivery
            entry = self.entries.get(to)
            passing = dest is not None and dest != self.router_id  # on its way to another router
            if entry is None and not passing and self.queues.lookup(to) is not None:
                entry = self._queue_entry(to)
            delivery.address = to
        else:
            delivery.address = entry.address
        if deadline is not None and deadline <= now:
            self.counters.expired += 1
            self._finish(delivery, EXPIRED)
            return delivery
        via = None if dest is None or dest == self.router_id else self._toward(delivery, dest)
        if via is not None:
            delivery.pending = 1
            self._offer(via, delivery)
        elif entry is None or not entry.reachable:
            router = _dynamic_router(delivery.address) if entry is None else None
            via = None if router is None or router == self.router_id else self._toward(delivery, router)
            if via is None:
                self._unroutable(delivery)
                return delivery
            delivery.pending = 1
            self._offer(via, delivery)
        elif entry.remote:
            self._deliver_meshed(entry, delivery)
        else:
            self._deliver_here(entry, delivery)
        if not delivery.queued or link.from_router:
            self._move_on(delivery)
        return delivery

    def _unroutable(self, delivery: Delivery) -> None:
        """No consumer for the delivery, here or reachable: released (dropped if pre-settled), counted."""
        if delivery.settled:
            self.counters.dropped_no_consumer += 1
        else:
            self.counters.released_no_consumer += 1
        self._finish(delivery, RELEASED)

    def _deliver_here(self, entry: AddressEntry, delivery: Delivery) -> None:
        """Offer the delivery to the address's consumers on this router."""
        if entry.distribution is Distribution.MULTICAST:
            delivery.unicast = False
            targets = list(entry.consumers)
            delivery.pending = len(targets)
            for consumer in targets:
                self._offer(consumer, delivery)
        elif (group := entry.group) is not None:
            delivery.pending = 1
            consumers = group.consumers
            self._offer(
                consumers[0] if len(consumers) == 1 else self._choose(group, entry.distribution), delivery
            )
        else:
            # Consumers in several pools: a copy for each, the outcomes combined as for multicast.
            delivery.unicast = False
            pools = entry.pools
            delivery.pending = len(pools)
            for pool_group in pools:
                self._offer(self._choose(pool_group, entry.distribution), delivery)

    def _deliver_meshed(self, entry: AddressEntry, delivery: Delivery) -> None:
        """Offer the delivery to consumers here or on other routers (the address has some elsewhere)."""
        distribution = entry.distribution
        targets: list[ConsumerLink] = []
        if distribution is Distribution.MULTICAST:
            delivery.unicast = False
            targets += entry.consumers
            if len(delivery.trace) < MAX_HOPS - 1:
                visited = delivery.trace
                for neighbour in self.multicast.get(delivery.ingress or self.router_id, ()):
                    links = self.router_links.get(neighbour)
                    if links and neighbour not in visited:
                        targets.append(links[0])
                        self._hold(delivery)
        elif entry.consumers and distribution is Distribution.CLOSEST and entry.group is not None:
            self._deliver_here(entry, delivery)  # a consumer here is the closest
            return
        else:
            balanced = distribution is Distribution.BALANCED
            best = self._best_router(entry, delivery, balanced)
            group = entry.group
            if group is None:  # local pools: a copy for each, and one more for the consumers elsewhere
                delivery.unicast = False
                targets += [self._choose(pool, distribution) for pool in entry.pools]
            elif entry.consumers:  # balanced: a consumer here if it is as lightly loaded and can take it now
                mine = self._choose(group, distribution)
                if best is None or (mine.load <= best[1] and mine.can_take()):
                    best = None
                    targets.append(mine)
            if best is not None:
                via = self._toward(delivery, best[0], entry if balanced else None)
                if via is not None:
                    targets.append(via)
        delivery.pending = len(targets)
        for consumer in targets:
            self._offer(consumer, delivery)
        if not targets:
            self._unroutable(delivery)

    def _best_router(self, entry: AddressEntry, delivery: Delivery, balanced: bool) -> tuple[str, int] | None:
        """The other router with consumers to send to, and its score: path cost, plus for balanced the
        deliveries sent to it and not yet settled. Ties take turns."""
        ties: list[str] = []
        low = 0
        routes = self.routes
        for router in entry.remote:
            route = routes.get(router)
            if route is None or router in delivery.trace:
                continue
            score = route.cost + entry.toward.get(router, 0) if balanced else route.cost
            if not ties or score < low:
                ties, low = [router], score
            elif score == low:
                ties.append(router)
        if not ties:
            return None
        group = entry.group
        turn = 0
        if group is not None and len(ties) > 1:
            turn = group.rotation = group.rotation + 1
        return sorted(ties)[turn % len(ties)], low

    def _toward(
        self, delivery: Delivery, router: str, accounted: AddressEntry | None = None
    ) -> ConsumerLink | None:
        """The router link to send the delivery on toward another router, on a next hop it has not passed
        (None if none). `accounted`: count it among the deliveries sent to that router until settled."""
        route = self.routes.get(router)
        if route is None or len(delivery.trace) >= MAX_HOPS - 1:
            return None
        for hop in route.next_hops:
            links = self.router_links.get(hop)
            if links and hop not in delivery.trace:
                break
        else:
            return None
        if accounted is not None and not delivery.settled and delivery.toward is None:
            delivery.toward = router
            accounted.toward[router] = accounted.toward.get(router, 0) + 1
        delivery.dest = router
        self._hold(delivery)
        return links[0]

    def _hold(self, delivery: Delivery) -> None:
        """An unsettled delivery entering the mesh here occupies its producer's credit until settled."""
        if delivery.ingress is None and not delivery.settled:
            delivery.held = True

    def _queue_entry(self, address: str) -> AddressEntry | None:
        """The entry of a queue address an anonymous-relay delivery goes to (created: the store takes it)."""
        try:
            return self._entry(address)
        except AttachError:  # configured unavailable: released, as any address without consumers
            return None

    def _choose(self, group: ConsumerGroup, distribution: Distribution) -> ConsumerLink:
        consumers = group.consumers
        count = len(consumers)
        if count == 1:
            return consumers[0]
        start = group.rotation = (group.rotation + 1) % count
        if distribution is Distribution.BALANCED:
            # The least loaded of those able to take it now, else of all. A consumer without credit (a server
            # that is stopping has drained its links) would otherwise win ties and keep the delivery waiting.
            best = consumers[start]
            ready = best.can_take()
            for i in range(1, count):
                candidate = consumers[(start + i) % count]
                candidate_ready = candidate.can_take()
                if candidate_ready > ready or (candidate_ready == ready and candidate.load < best.load):
                    best, ready = candidate, candidate_ready
            return best
        # closest: every local consumer is equally close; take turns among those able to take it now
        for i in range(count):
            candidate = consumers[(start + i) % count]
            if candidate.can_take():
                return candidate
        return consumers[start]

    def _offer(self, link: ConsumerLink, delivery: Delivery) -> None:
        if link.can_take():
            self._send(link, delivery)
        elif delivery.settled and delivery.ingress is not None and len(link.queue) >= PRESETTLED_QUEUE_LIMIT:
            # Rule 7 bounds nothing pre-settled that came from another router: at most once, it is shed here
            # rather than pile up in memory behind a consumer that does not keep up.
            self.counters.dropped_slow_consumer += 1
            self._copy_settled(delivery, RELEASED)
        else:
            link.queue.append(delivery)
            delivery.queued += 1
            if delivery.deadline is not None:
                self._expiring.add(link)

    def _send(self, link: ConsumerLink, delivery: Delivery) -> None:
        handle = link.edge.send(link, delivery)
        link.credit -= 1
        link.delivered += 1
        self.counters.delivered += 1
        if not delivery.complete:
            link.streaming = delivery
        if delivery.settled:
            return
        if link.settle_on_send:
            self._copy_settled(delivery, ACCEPTED)  # the consumer asked for at-most-once
        else:
            link.inflight[handle] = delivery

    def _move_on(self, delivery: Delivery) -> None:
        """The delivery no longer occupies its producer's credit."""
        if delivery.moved_on or delivery.held:
            return
        delivery.moved_on = True
        link = delivery.link
        link.held -= 1
        # Credit is given back in batches of a quarter of the capacity to keep flow frames rare.
        if (link.capacity - link.held - link.credit) * 4 >= link.capacity and not link.closed:
            self._replenish(link)

    def _finish(self, delivery: Delivery, outcome: Outcome) -> None:
        """Settle a delivery that goes no further (no consumer, expired, refused)."""
        delivery.pending = 0
        self._move_on(delivery)
        self._settle_producer(delivery, outcome)

    def _settle_producer(self, delivery: Delivery, outcome: Outcome) -> None:
        """Tell the producer the final outcome, once, unless it no longer listens."""
        if not delivery.settled:
            delivery.settled = True
            delivery.link.inflight.pop(delivery.handle, None)
            delivery.link.edge.settle(delivery, outcome)

    def stream_finished(self, link: ConsumerLink, now: float, aborted: Handle = None) -> None:
        """The edge completed the multi-frame delivery that held this consumer's link, or aborted its copy
        `aborted` (whose outcome then never comes)."""
        if aborted is not None:
            link.inflight.pop(aborted, None)
        link.streaming = None
        self._pump(link, now)

    def abort(self, delivery: Delivery) -> None:
        """The producer aborted a multi-frame delivery: queued copies are dropped."""
        delivery.aborted = True
        delivery.settled = True
        delivery.held = False  # its copies are aborted: no outcome will come back
        delivery.link.inflight.pop(delivery.handle, None)
        self._unqueue(delivery)
        self._move_on(delivery)

    def _unqueue(self, delivery: Delivery) -> None:
        """Take the delivery's waiting copies out of its consumers' queues."""
        if not delivery.queued:
            return
        entry = self.entries.get(delivery.address)
        links = [link for links in self.router_links.values() for link in links]
        for link in links + (entry.consumers if entry is not None else []):
            if delivery in link.queue:
                link.queue.remove(delivery)
                delivery.queued -= 1

    def refuse(self, delivery: Delivery, outcome: Outcome) -> None:
        """The edge refuses a delivery mid-way (too large): copies already started are aborted by the edge."""
        self.counters.rejected += 1
        self._unqueue(delivery)
        delivery.aborted = True
        delivery.held = False  # its copies are aborted: no outcome will come back
        self._finish(delivery, outcome)

    # -- outcomes ------------------------------------------------------------------------------------

    def consumer_outcome(self, link: ConsumerLink, handle: Handle, outcome: Outcome, settled: bool) -> None:
        """A consumer reported the state of a delivery we sent it."""
        if not settled:
            delivery = link.inflight.get(handle)
            if delivery is not None and delivery.unicast and not delivery.settled:
                delivery.link.edge.update(delivery, outcome)
            return
        delivery = link.inflight.pop(handle, None)
        if delivery is not None:
            self._copy_settled(delivery, outcome)

    def producer_settled(self, link: ProducerLink, handle: Handle) -> None:
        """The producer settled first: it no longer wants to hear the outcome."""
        delivery = link.inflight.pop(handle, None)
        if delivery is not None:
            delivery.settled = True

    def _copy_settled(self, delivery: Delivery, outcome: Outcome) -> None:
        """One copy of the delivery reached its final state; settle the producer when all have."""
        delivery.pending -= 1
        if delivery.toward is not None:
            self._arrived(delivery)
        if delivery.unicast:
            final = outcome
        else:
            if outcome.kind == ACCEPTED_KIND:
                delivery.accepted = True
            elif outcome.kind == REJECTED_KIND and delivery.refusal is None:
                delivery.refusal = outcome
            if delivery.pending > 0:
                return
            final = delivery.refusal or (ACCEPTED if delivery.accepted else RELEASED)
        if delivery.held:
            delivery.held = False
            if not delivery.queued:
                self._move_on(delivery)
        self._settle_producer(delivery, final)

    def _arrived(self, delivery: Delivery) -> None:
        """A delivery sent toward another router is settled: it no longer weighs on that router's score."""
        router, delivery.toward = delivery.toward, None
        entry = self.entries.get(delivery.address)
        if entry is not None and router is not None:
            left = entry.toward.get(router, 0) - 1
            if left > 0:
                entry.toward[router] = left
            else:
                entry.toward.pop(router, None)

    # -- the mesh ------------------------------------------------------------------------------------

    def attach_router_link(self, handle: Handle, neighbour: str, owner: Any = None) -> ConsumerLink:
        """The data link on which this router sends to a neighbouring router."""
        entry = AddressEntry(f"{MESH_PREFIX}data/{neighbour}", Distribution.CLOSEST)  # never in the table
        link = ConsumerLink(handle, entry.address, entry, self._edge, owner, router=neighbour)
        entry.consumers.append(link)
        self.router_links.setdefault(neighbour, []).append(link)
        return link

    def set_routes(self, routes: Mapping[str, Route], multicast: Mapping[str, frozenset[str]]) -> None:
        """The mesh computed new paths: every other reachable router, and the multicast trees."""
        self.routes = routes
        self.multicast = multicast
        for address in list(self._remote_dynamic):
            router = _dynamic_router(address)
            assert router is not None
            self.remote_changed(address, frozenset((router,)) if router in routes else frozenset())

    # -- time ----------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire queued deliveries whose time has passed."""
        for link in list(self._expiring):
            kept: deque[Delivery] = deque()
            for delivery in link.queue:
                if delivery.deadline is not None and delivery.deadline <= now:
                    delivery.queued -= 1
                    self._expire_copy(delivery)
                    if not delivery.queued:
                        self._move_on(delivery)
                else:
                    kept.append(delivery)
            link.queue = kept
            if not any(d.deadline is not None for d in kept):
                self._expiring.discard(link)
            self._answer_drain(link)

    def _expire_copy(self, delivery: Delivery) -> None:
        self.counters.expired += 1
        self._copy_settled(delivery, EXPIRED)


def _dynamic_router(address: str) -> str | None:
    """The router that made a dynamic address (`_dynamic/<router id>/...`); None for other addresses."""
    if not address.startswith(DYNAMIC_PREFIX):
        return None
    router, slash, _ = address[len(DYNAMIC_PREFIX) :].partition("/")
    return router if slash else None
