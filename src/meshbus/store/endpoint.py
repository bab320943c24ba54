"""The store's endpoint in the router: the core's Edge for the store's own links, its Watcher and QueueHost.

Rules of this module:
1. It translates between the router core and the store; it decides nothing about routing (core.py does)
   nor about messages (queue.py does). Plain code: no asyncio, threads, sockets or clock (time comes from
   the `clock` it is given). The group commit is driven from outside (meshbus.amqp.storehost): `wake()`
   asks for a turn, then `turn()`, `sealed()`/`committed(batch)`/`failed(batch)` and `expire()`.
2. Ingress: on each queue address X that gets an entry, the endpoint consumes through a link of its own
   (`intake`). A producer's delivery is appended with (link, delivery) as its token and accepted once its
   batch is written, or once every pool has accepted it if that came first; refused (QueueFull:
   amqp:resource-limit-exceeded; EngineFailed: amqp:internal-error) or expired at once. The link's credit
   is what the store allows (`intake_credit`), reviewed at each turn: none while the disk lags too far
   behind.
3. Egress: while the core says `_queue/<pool>/X` is reachable (its consumers, here or elsewhere), a
   producer link of the endpoint feeds it from the store's group `pool` of X; the core's credit for that
   link is the group's credit in the store, and each consumer's outcome is the store's settlement.
4. Outcomes the endpoint knows while the core is calling it wait for the next `turn()`: the core records
   a delivery as sent only after `send` has returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Final

from meshbus.router.addressing import QueueRule
from meshbus.router.core import (
    ACCEPTED,
    ACCEPTED_KIND,
    EXPIRED,
    MODIFIED_KIND,
    REJECTED_KIND,
    ConsumerLink,
    Delivery,
    Outcome,
    ProducerLink,
    RouterCore,
    parse_queue_address,
    rejected,
    store_address,
)
from meshbus.store.engine import Batch, EngineFailed
from meshbus.store.header import with_delivery_count
from meshbus.store.queue import QueueFull, Settlement
from meshbus.store.store import MAX_UNWRITTEN, Store

log = logging.getLogger("meshbus.store")

INTAKE_WINDOW: Final = 2000  # credit of the store's link on a queue address while the disk keeps up
OUTLET_CAPACITY: Final = 250  # deliveries the store hands the core per pool before they leave the router
_SETTLEMENTS: Final = {
    ACCEPTED_KIND: Settlement.ACCEPTED,
    REJECTED_KIND: Settlement.REJECTED,
    MODIFIED_KIND: Settlement.MODIFIED,
}


@dataclass(eq=False, slots=True)
class Outlet:
    """A pool's subscription to a queue: the store's consumer, and the core's producer link feeding it."""

    address: str  # the queue address
    pool: str | None
    link: ProducerLink | None = None


@dataclass(eq=False, slots=True)
class _Pending:
    link: ConsumerLink
    delivery: Delivery
    outcome: Outcome | None = None  # None: a multi-frame delivery, stored once it has all arrived


@dataclass(slots=True)
class EndpointCounters:
    """What producers' messages to the queues became, for the operator."""

    stored: int = 0
    refused: int = 0  # the queue was full
    failed: int = 0  # the store could not be written
    consumed_unwritten: int = 0  # of those stored: accepted by every pool before their write (never written)

    def __str__(self) -> str:
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self))


class StoreEndpoint:
    """Serves the queues of `rules` from `store` through the router `core`."""

    def __init__(
        self,
        store: Store,
        core: RouterCore,
        rules: Iterable[QueueRule],
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.core = core
        self.rules = frozenset(rules)
        self.clock = clock
        self.wake = wake
        self.intake: dict[str, ConsumerLink] = {}  # queue address -> the store's link consuming from it
        self.outlets: dict[str, Outlet] = {}  # internal _queue/ address -> its subscription
        self.counters = EndpointCounters()
        self._pending: list[_Pending] = []
        self._review: dict[ConsumerLink, None] = {}  # intake links whose credit to review after a commit
        self._full: set[str] = set()  # queues that refused since they last took a message (logged once)

    def start(self) -> None:
        """Take the queue addresses' entries: be the core's queue host and watcher, advertise the rules."""
        self.core.queue_host = self
        self.core.watchers.append(self)
        for rule in sorted(self.rules, key=lambda r: r.key):
            self.core.attach_store(store_address(rule), store_address(rule), self)

    # -- QueueHost -----------------------------------------------------------------------------------

    def hosts(self, rule: QueueRule) -> bool:
        return rule in self.rules

    def serve(self, address: str) -> None:
        link = self.intake[address] = self.core.attach_store(address, address, self)
        self.core.consumer_credit(link, self.intake_credit(address), False, self.clock())

    def intake_credit(self, address: str) -> int:
        """Credit for producers to a queue: none while the disk is behind; a full queue gets credit so that
        what is sent to it is refused with QueueFull (an error for the producer), not left waiting."""
        if self.store.engine.unwritten_bytes >= MAX_UNWRITTEN:
            return 0
        return self.store.producer_credit(address, INTAKE_WINDOW) or INTAKE_WINDOW

    # -- Watcher -------------------------------------------------------------------------------------

    def local_consumers(self, address: str, present: bool) -> None:
        pass  # the mesh's concern

    def reachable(self, address: str, present: bool) -> None:
        parsed = parse_queue_address(address)
        if parsed is None:
            return
        pool, queue = parsed
        rule = self.core.queues.lookup(queue)
        if rule is None or rule not in self.rules:
            return
        if present:
            outlet = self.outlets[address] = Outlet(queue, pool)
            self.store.attach(queue, outlet, pool)
            outlet.link = self.core.attach_producer(outlet, address, OUTLET_CAPACITY, edge=self)
        else:
            gone = self.outlets.pop(address, None)
            if gone is None or gone.link is None:
                return  # reachable before the store started: it never fed this address
            self.core.detach_producer(gone.link)
            self.store.detach(gone, self.clock())
            self.wake()

    # -- Edge: the intake links ----------------------------------------------------------------------

    def send(self, link: ConsumerLink, delivery: Delivery) -> Delivery:
        self._review[link] = None
        if not delivery.complete:
            # Still arriving: the protocol edge gathers its frames; stored once the last has come.
            delivery.gathering = True
            self._pending.append(_Pending(link, delivery))
            self.wake()
            return delivery
        outcome = self._take(link, delivery)
        if outcome is not None:
            self._pending.append(_Pending(link, delivery, outcome))
        self.wake()
        return delivery

    def _take(self, link: ConsumerLink, delivery: Delivery) -> Outcome | None:
        """Append a whole delivery to its queue: None once it is in the open batch (accepted when written),
        else the outcome that refuses it."""
        address = link.address
        try:
            if self.store.append(
                address, bytes(delivery.payload), delivery.deadline, self.clock(), (link, delivery)
            ):
                self.counters.stored += 1
                self._full.discard(address)
                return None
            return EXPIRED
        except QueueFull as error:
            self.counters.refused += 1
            if address not in self._full:
                self._full.add(address)
                log.warning("%s", error)
            return rejected(error.condition, str(error))
        except EngineFailed as error:
            self.counters.failed += 1
            return rejected("amqp:internal-error", str(error))

    def drained(self, link: ConsumerLink) -> None:
        pass  # the store's links never ask to drain

    # -- Edge: the outlet links ----------------------------------------------------------------------

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        settlement = _SETTLEMENTS.get(outcome.kind, Settlement.RELEASED)
        self.store.settle(delivery.link.handle, delivery.handle, settlement, self.clock())
        self.wake()

    def update(self, delivery: Delivery, outcome: Outcome) -> None:
        pass  # only final outcomes matter to the store

    def flow(self, link: ProducerLink, credit: int) -> None:
        self.store.flow(link.handle, link.credit)
        self.wake()

    def withdraw_credit(self, link: ProducerLink) -> None:
        self.store.flow(link.handle, 0)

    # -- turns, driven from outside ------------------------------------------------------------------

    def turn(self) -> None:
        """Report the outcomes known since the last turn, then hand the consumers what the store has."""
        now = self.clock()
        core = self.core
        consumed = self.store.finished_before_written()
        self.counters.consumed_unwritten += len(consumed)
        for token in consumed:
            core.consumer_outcome(*_intake(token), ACCEPTED, settled=True)
        self._review_credit()
        pending, self._pending = self._pending, []
        for item in pending:
            delivery = item.delivery
            if item.outcome is not None:
                core.consumer_outcome(item.link, delivery, item.outcome, settled=True)
            elif delivery.aborted:  # its producer gave up on it: nothing to store, no outcome to give
                core.stream_finished(item.link, now, aborted=delivery)
            elif delivery.complete:  # the last frame came
                outcome = self._take(item.link, delivery)
                if outcome is not None:
                    core.consumer_outcome(item.link, delivery, outcome, settled=True)
                core.stream_finished(item.link, now)
            else:
                self._pending.append(item)  # still arriving
        for out in self.store.deliveries(now):
            outlet = out.consumer
            assert isinstance(outlet, Outlet) and outlet.link is not None
            payload = out.payload if out.count == 0 else with_delivery_count(out.payload, out.count)
            core.deliver(
                outlet.link,
                out.offset,
                payload,
                complete=True,
                settled=False,
                to=None,
                deadline=out.deadline,
                now=now,
            )

    @property
    def streaming(self) -> bool:
        """Multi-frame deliveries are still arriving: turns are needed until they complete."""
        return bool(self._pending)

    def committed(self, batch: Batch) -> None:
        """`batch` was written: accept the producers' messages it made durable."""
        core = self.core
        for token in self.store.completed(batch):
            core.consumer_outcome(*_intake(token), ACCEPTED, settled=True)
        self.turn()

    def failed(self, batch: Batch, error: EngineFailed) -> None:
        """Writing `batch` failed: its producers' messages are refused (the store takes no more)."""
        outcome = rejected("amqp:internal-error", str(error))
        for token in batch.all_tokens():
            self.core.consumer_outcome(*_intake(token), outcome, settled=True)

    def _review_credit(self) -> None:
        review, self._review = self._review, {}
        now = self.clock()
        for link in review:
            if link.closed:
                continue
            credit = self.intake_credit(link.address)
            if credit == 0:
                self._review[link] = None  # again at the next turn
            if credit != link.credit:
                self.core.consumer_credit(link, credit, False, now)

    def expire(self) -> int:
        expired = self.store.expire(self.clock())
        if expired:
            self.turn()
        return expired


def _intake(token: object) -> tuple[ConsumerLink, Delivery]:
    """The (intake link, delivery) an append's token stands for."""
    assert isinstance(token, tuple)
    link, delivery = token
    return link, delivery
