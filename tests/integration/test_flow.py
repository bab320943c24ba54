"""Credit, drain, no-consumer releases and expiry, seen by real clients through a real router."""

from __future__ import annotations

import time
from collections.abc import Callable

from proton import Delivery, Event, Message

from tests.conftest import Config, Router
from tests.integration.clients import Client, Exchange, numbered, run, the, unique

ALONE = 0.5  # seconds a producer waits with no consumer on its address


class CreditWatch(Client):
    """A producer attaches alone; after ALONE seconds a consumer attaches, and detaches once credit came."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url)
        self.address = address
        self.phase = "alone"
        self.credit_seen: dict[str, list[int]] = {
            "alone": [],
            "consumer attached": [],
            "consumer detached": [],
        }
        self.credit_after_waiting: int | None = None

    def begin(self) -> None:
        self.sender = self.container.create_sender(self.connect(), self.address, name="producer")

    def on_link_opened(self, event: Event) -> None:
        if event.link == self.sender:
            self.later(ALONE, self.attach_consumer)

    def attach_consumer(self) -> None:
        self.credit_after_waiting = self.sender.credit
        self.phase = "consumer attached"
        self.receiver = self.container.create_receiver(self.connect(), self.address, name="consumer")

    def on_link_flow(self, event: Event) -> None:
        if event.link != self.sender:
            return
        credit = self.sender.credit
        self.credit_seen[self.phase].append(credit)
        if self.phase == "consumer attached" and credit > 0:
            self.phase = "consumer detached"
            self.receiver.close()
        elif self.phase == "consumer detached" and credit == 0:
            self.done()


def test_credit_is_withheld_until_a_consumer_attaches_and_withdrawn_when_it_goes(
    default_router: Router,
) -> None:
    client = run(CreditWatch(default_router.url, unique("test/credit")))
    print("producer credit by phase:", client.credit_seen)
    assert client.credit_after_waiting == 0
    assert all(credit == 0 for credit in client.credit_seen["alone"])
    assert max(client.credit_seen["consumer attached"]) > 0
    assert client.credit_seen["consumer detached"][-1] == 0


def test_the_credit_granted_is_the_listeners_link_capacity(router: Callable[[Config], Router]) -> None:
    frugal = router({"listener": [{"link_capacity": 7}]})
    client = run(CreditWatch(frugal.url, unique("test/credit")))
    assert max(client.credit_seen["consumer attached"]) == 7


def test_released_at_once_when_no_consumer_on_an_anonymous_relay_link(default_router: Router) -> None:
    exchange = run(
        Exchange(default_router.url, unique("test/nobody"), numbered("lost", 3), [], anonymous=True)
    )
    outcomes = exchange.settled_outcomes()
    print("released after (s):", [round(o.seconds, 4) for o in outcomes])
    assert [o.name for o in outcomes] == ["released"] * 3
    assert max(o.seconds for o in outcomes) < 2.0


def test_deliveries_to_nobody_are_counted(router: Callable[[Config], Router]) -> None:
    counted = router({})
    run(Exchange(counted.url, unique("test/nobody"), numbered("lost", 3), [], anonymous=True))
    counted.stop()
    assert counted.wait_for_log(r"stopped: .*released_no_consumer=3 ", timeout=1) is not None, counted.log()


class Drainer(Client):
    """A consumer with no credit on the same connection as a producer that first sends `queued` messages to
    it (they wait in the router); then the consumer asks to drain with `credit`."""

    def __init__(self, url: str, address: str, queued: int, credit: int = 5) -> None:
        super().__init__(url, prefetch=0)
        self.address = address
        self.queued = queued
        self.credit = credit
        self.received: list[object] = []
        self.accepted = 0
        self.drain_started = False
        self.credit_after_drain: int | None = None

    def begin(self) -> None:
        connection = self.connect()
        self.receiver = self.container.create_receiver(connection, self.address, name="consumer")
        self.sender = self.container.create_sender(connection, self.address, name="producer")

    def on_sendable(self, event: Event) -> None:
        if self.sender.credit and self.queued and not self.drain_started:
            for message in numbered("queued", self.queued):
                self.sender.send(message)
            # The transfers are written out before the flow frame starting the drain: same socket, in order.
            self.later(0.1, self.drain)
            self.drain_started = True

    def on_link_opened(self, event: Event) -> None:
        if event.link == self.receiver and not self.queued:
            self.drain()

    def drain(self) -> None:
        self.drain_started = True
        self.receiver.drain(self.credit)

    def on_message(self, event: Event) -> None:
        self.received.append(event.message.body)

    def on_accepted(self, event: Event) -> None:
        self.accepted += 1
        self._check_done()

    def on_link_flow(self, event: Event) -> None:
        if event.link == self.receiver and self.drain_started and not self.receiver.draining():
            self.credit_after_drain = self.receiver.credit
            self._check_done()

    def _check_done(self) -> None:
        if self.credit_after_drain is not None and self.accepted == self.queued:
            self.done()


def test_drain_with_nothing_to_send_spends_the_credit(default_router: Router) -> None:
    client = run(Drainer(default_router.url, unique("test/drain"), queued=0))
    assert client.credit_after_drain == 0
    assert client.received == []


def test_drain_with_messages_queued_delivers_them_then_spends_the_rest(default_router: Router) -> None:
    client = run(Drainer(default_router.url, unique("test/drain"), queued=3))
    assert client.received == ["queued-0", "queued-1", "queued-2"]
    assert client.credit_after_drain == 0


class HandOn(Client):
    """Two consumers of one address, both without credit, and a producer, on one connection: the producer's
    messages wait in the router, for either consumer. Then `leaving` drains (as a server that stops) and
    `staying` grants credit: two flow frames, in that order."""

    def __init__(self, url: str, address: str, count: int) -> None:
        super().__init__(url, prefetch=0)
        self.address = address
        self.count = count
        self.sent = False
        self.received: dict[str, list[object]] = {"leaving": [], "staying": []}
        self.accepted = 0

    def begin(self) -> None:
        connection = self.connect()
        self.leaving = self.container.create_receiver(connection, self.address, name="leaving")
        self.staying = self.container.create_receiver(connection, self.address, name="staying")
        self.sender = self.container.create_sender(connection, self.address, name="producer")

    def on_sendable(self, event: Event) -> None:
        if not self.sent:
            self.sent = True
            for message in numbered("waiting", self.count):
                self.sender.send(message)
            # Written before the flow frames: same connection, in order.
            self.later(0.1, self.drain_one_credit_the_other)

    def drain_one_credit_the_other(self) -> None:
        self.leaving.drain(0)
        self.staying.flow(self.count)

    def on_message(self, event: Event) -> None:
        self.received[the(event.link).name].append(event.message.body)

    def on_accepted(self, event: Event) -> None:
        self.accepted += 1
        if self.accepted == self.count:
            self.done()


def test_what_waits_for_a_consumer_that_drains_goes_to_one_that_does_not(default_router: Router) -> None:
    client = run(HandOn(default_router.url, unique("test/hand-on"), count=4))
    assert client.received["leaving"] == []
    assert sorted(map(str, client.received["staying"])) == [f"waiting-{n}" for n in range(4)]


def test_a_message_already_expired_is_not_delivered_and_comes_back_undeliverable(
    default_router: Router,
) -> None:
    stale = Message(body="stale", expiry_time=time.time() - 60)  # absolute-expiry-time in the past
    exchange = run(Exchange(default_router.url, unique("test/expiry"), [stale, Message(body="fresh")]))
    assert exchange.bodies(0) == ["fresh"]
    expired, fresh = exchange.settled_outcomes()
    assert (expired.name, expired.undeliverable) == ("modified", True)
    assert fresh.name == "accepted"


def test_a_ttl_wins_over_an_absolute_expiry_time_from_another_clock(default_router: Router) -> None:
    # oslo.messaging 14's AMQP 1.0 driver sets absolute-expiry-time from a monotonic clock (1970 here) and a
    # correct ttl: the message must be delivered.
    message = Message(body="call", ttl=60, expiry_time=time.monotonic() + 60)
    exchange = run(Exchange(default_router.url, unique("test/expiry"), [message]))
    assert exchange.bodies(0) == ["call"]
    assert exchange.settled_outcomes()[0].name == "accepted"


class ExpiryWhileQueued(Client):
    """A message with a short ttl waits behind a consumer without credit; once the producer has its outcome,
    the consumer gets credit for one message and a fresh one is sent: that is the one it must receive."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url, prefetch=0)
        self.address = address
        self.outcomes: dict[str, tuple[int, bool]] = {}
        self.received: list[object] = []
        self._sent: dict[object, str] = {}  # the body of each delivery

    def begin(self) -> None:
        self.receiver = self.container.create_receiver(self.connect(), self.address, name="consumer")
        self.sender = self.container.create_sender(self.connect(), self.address, name="producer")

    def on_sendable(self, event: Event) -> None:
        if not self._sent:
            self._sent[self.sender.send(Message(body="short-lived", ttl=0.3))] = "short-lived"

    def on_settled(self, event: Event) -> None:
        body = self._sent.get(event.delivery)
        if body is None:
            return
        delivery = the(event.delivery)
        self.outcomes[body] = (delivery.remote_state, bool(delivery.remote.undeliverable))
        if body == "short-lived":
            self.receiver.flow(1)
            self._sent[self.sender.send(Message(body="fresh"))] = "fresh"
        else:
            self.done()

    def on_message(self, event: Event) -> None:
        self.received.append(event.message.body)


def test_a_message_expiring_while_queued_is_not_delivered_when_credit_comes(default_router: Router) -> None:
    client = run(ExpiryWhileQueued(default_router.url, unique("test/expiry")))
    assert client.outcomes["short-lived"] == (Delivery.MODIFIED, True)
    assert client.outcomes["fresh"] == (Delivery.ACCEPTED, False)
    assert client.received == ["fresh"]


class ConsumerLeaves(Client):
    """The consumer receives a message and detaches without settling it."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url, auto_accept=False)
        self.address = address
        self.sent = False
        self.outcome: tuple[int, bool] | None = None  # (state, delivery-failed) seen by the producer

    def begin(self) -> None:
        self.receiver = self.container.create_receiver(self.connect(), self.address, name="consumer")
        self.sender = self.container.create_sender(self.connect(), self.address, name="producer")

    def on_sendable(self, event: Event) -> None:
        if not self.sent:
            self.sent = True
            self.sender.send(Message(body="unsettled"))

    def on_message(self, event: Event) -> None:
        self.receiver.close()

    def on_settled(self, event: Event) -> None:
        delivery = the(event.delivery)
        if delivery.link == self.sender:
            self.outcome = (delivery.remote_state, bool(delivery.remote.failed))
            self.done()


def test_a_consumer_leaving_with_a_delivery_unsettled_sends_it_back_delivery_failed(
    default_router: Router,
) -> None:
    client = run(ConsumerLeaves(default_router.url, unique("test/leaving")))
    assert client.outcome == (Delivery.MODIFIED, True)
