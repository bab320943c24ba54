"""Routing through a real router: unicast, RPC on dynamic addresses, balanced, closest, multicast, the
address rules (defaults, patterns, unavailable), outcomes and pre-settled deliveries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from proton import Condition, Event, Message
from proton.reactor import AtMostOnce, SenderOption

from tests.conftest import Config, Router
from tests.integration.clients import (
    ACCEPT,
    REJECT,
    REJECTION,
    RELEASE,
    Client,
    Exchange,
    numbered,
    run,
    the,
    unique,
)


def test_send_and_receive(default_router: Router) -> None:
    messages = numbered("hello", 600)  # more than a link's credit (250): credit must be replenished
    exchange = run(Exchange(default_router.url, unique("test/unicast"), messages))
    assert exchange.bodies(0) == [m.body for m in messages]
    assert [o.name for o in exchange.settled_outcomes()] == ["accepted"] * 600


def test_send_and_receive_on_an_anonymous_relay_link(default_router: Router) -> None:
    messages = numbered("relayed", 5)
    exchange = run(Exchange(default_router.url, unique("test/unicast"), messages, anonymous=True))
    assert exchange.bodies(0) == [m.body for m in messages]
    assert [o.name for o in exchange.settled_outcomes()] == ["accepted"] * 5


class RpcClient(Client):
    """A server on a service address replies through an anonymous-relay sender to each request's reply_to;
    the caller receives the replies on a dynamic address the router assigned."""

    def __init__(self, url: str, service: str, requests: int) -> None:
        super().__init__(url)
        self.service = service
        self.requests = requests
        self.reply_address: str | None = None
        self.replies: dict[Any, Any] = {}
        self.sent = False

    def begin(self) -> None:
        server = self.connect()
        self.server_receiver = self.container.create_receiver(server, self.service, name="server")
        self.reply_sender = self.container.create_sender(server, None, name="server-replies")
        caller = self.connect()
        self.reply_receiver = self.container.create_receiver(caller, None, dynamic=True, name="replies")
        self.request_sender = self.container.create_sender(caller, self.service, name="requests")

    def on_link_opened(self, event: Event) -> None:
        if event.link == self.reply_receiver:
            self.reply_address = event.link.remote_source.address
            assert self.reply_address, "the router did not echo an address for the dynamic source"
            self.on_sendable(event)

    def on_sendable(self, event: Event) -> None:
        # Credit comes once the server's receiver is attached; the reply address once the router echoed it.
        if self.sent or self.reply_address is None or not self.request_sender.credit:
            return
        self.sent = True
        for n in range(self.requests):
            self.request_sender.send(Message(id=f"request-{n}", reply_to=self.reply_address, body={"n": n}))

    def on_message(self, event: Event) -> None:
        message = event.message
        if event.receiver == self.server_receiver:
            reply = Message(
                address=message.reply_to, correlation_id=message.id, body={"doubled": 2 * message.body["n"]}
            )
            self.reply_sender.send(reply)
        else:
            self.replies[message.correlation_id] = message.body
            if len(self.replies) == self.requests:
                self.done()


def test_rpc_with_a_dynamic_reply_address_and_an_anonymous_relay_reply_sender(default_router: Router) -> None:
    client = run(RpcClient(default_router.url, unique("test/rpc"), requests=5))
    assert client.reply_address is not None
    assert client.replies == {f"request-{n}": {"doubled": 2 * n} for n in range(5)}


def test_rpc_through_a_router_that_never_busy_polls(router: Callable[[Config], Router]) -> None:
    sleeping = router({"router": {"busy_poll": 0}})
    client = run(RpcClient(sleeping.url, unique("test/rpc"), requests=50))
    assert client.replies == {f"request-{n}": {"doubled": 2 * n} for n in range(50)}


def test_balanced_spreads_over_three_consumers_by_unsettled_count(default_router: Router) -> None:
    # Consumers hold every delivery unsettled until all have arrived: "fewest unsettled" then means turns.
    messages = numbered("work", 30)
    exchange = run(Exchange(default_router.url, unique("test/balanced"), messages, [ACCEPT] * 3, hold=True))
    shares = [len(received) for received in exchange.received]
    print("balanced shares:", shares)
    assert sorted(shares) == [10, 10, 10]
    everything = Counter(body for consumer in range(3) for body in exchange.bodies(consumer))
    assert everything == Counter(m.body for m in messages)
    assert {o.name for o in exchange.settled_outcomes()} == {"accepted"}


def test_closest_delivers_each_message_exactly_once(default_router: Router) -> None:
    messages = numbered("nearby", 40)
    exchange = run(Exchange(default_router.url, unique("test/closest"), messages, [ACCEPT, ACCEPT]))
    print("closest shares:", [len(received) for received in exchange.received])
    everything = Counter(body for consumer in range(2) for body in exchange.bodies(consumer))
    assert everything == Counter(m.body for m in messages)
    assert {o.name for o in exchange.settled_outcomes()} == {"accepted"}


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        ((ACCEPT, ACCEPT, ACCEPT), "accepted"),
        ((ACCEPT, RELEASE, RELEASE), "accepted"),
        ((ACCEPT, REJECT, ACCEPT), "rejected"),
        ((RELEASE, RELEASE, RELEASE), "released"),
    ],
    ids=["all-accept", "one-accepts-two-release", "one-rejects", "all-release"],
)
def test_multicast_gives_every_receiver_every_message_and_one_aggregate_outcome(
    default_router: Router, policies: tuple[str, ...], expected: str
) -> None:
    messages = numbered("fanout", 5)
    exchange = run(Exchange(default_router.url, unique("test/multicast"), messages, policies))
    for consumer in range(3):
        assert exchange.bodies(consumer) == [m.body for m in messages], f"receiver {consumer}"
    assert [o.name for o in exchange.settled_outcomes()] == [expected] * 5
    if expected == "rejected":
        condition = exchange.settled_outcomes()[0].condition
        assert condition is not None and condition.name == REJECTION.name


def test_rejection_with_an_error_condition_reaches_the_producer(default_router: Router) -> None:
    exchange = run(Exchange(default_router.url, unique("test/unicast"), numbered("refused", 1), [REJECT]))
    [outcome] = exchange.settled_outcomes()
    assert outcome.name == "rejected"
    assert outcome.condition is not None
    assert (outcome.condition.name, outcome.condition.description) == (REJECTION.name, REJECTION.description)


class AttachRefused(Client):
    """Attach a receiver and a sender to an address; record the condition each detach carries."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url)
        self.address = address
        self.conditions: dict[str, Condition | None] = {}

    def begin(self) -> None:
        connection = self.connect()
        self.container.create_receiver(connection, self.address, name="receiver")
        self.container.create_sender(connection, self.address, name="sender")

    def on_link_error(self, event: Event) -> None:
        link = the(event.link)
        self.conditions[link.name] = link.remote_condition
        self._check_done()

    def on_link_closing(self, event: Event) -> None:
        self.conditions[the(event.link).name] = None
        self._check_done()

    def _check_done(self) -> None:
        if len(self.conditions) == 2:
            self.done()


def test_an_unavailable_address_refuses_attaches_with_not_found(default_router: Router) -> None:
    address = unique("test/unavailable")
    client = run(AttachRefused(default_router.url, address))
    for name in ("receiver", "sender"):
        condition = client.conditions[name]
        assert condition is not None, f"{name}: detached without an error condition"
        assert condition.name == "amqp:not-found", f"{name}: {condition}"
        assert address in (condition.description or "")


class AtMostOnceSender(Client):
    """A producer whose link sends every message pre-settled; the consumer records how each arrives."""

    def __init__(self, url: str, address: str, count: int) -> None:
        super().__init__(url)
        self.address = address
        self.count = count
        self.sent = False
        self.arrivals: list[tuple[object, bool]] = []  # (body, settled by the producer)

    def begin(self) -> None:
        self.container.create_receiver(self.connect(), self.address, name="consumer")

    def on_link_opened(self, event: Event) -> None:
        if the(event.link).is_receiver:
            self.container.create_sender(self.connect(), self.address, name="producer", options=AtMostOnce())

    def on_sendable(self, event: Event) -> None:
        if not self.sent:
            self.sent = True
            for message in numbered("once", self.count):
                the(event.sender).send(message)

    def on_message(self, event: Event) -> None:
        self.arrivals.append((the(event.message).body, the(event.delivery).settled))
        if len(self.arrivals) == self.count:
            self.done()


def test_pre_settled_messages_arrive_pre_settled(default_router: Router) -> None:
    client = run(AtMostOnceSender(default_router.url, unique("test/presettled"), 10))
    assert client.arrivals == [(f"once-{n}", True) for n in range(10)]


def test_anonymous_relay_to_a_multicast_address_reaches_every_receiver(default_router: Router) -> None:
    messages = numbered("relayed-fanout", 3)
    exchange = run(
        Exchange(default_router.url, unique("test/multicast"), messages, [ACCEPT] * 3, anonymous=True)
    )
    for consumer in range(3):
        assert exchange.bodies(consumer) == [m.body for m in messages], f"receiver {consumer}"
    assert [o.name for o in exchange.settled_outcomes()] == ["accepted"] * 3


@pytest.mark.parametrize(
    ("prefix", "copies"),
    [
        ("openstack.org/om/rpc/multicast/exchange/topic", 2),
        ("openstack.org/om/rpc/unicast/exchange/topic/server", 1),
        ("openstack.org/om/rpc/anycast/exchange/topic", 1),
        ("openstack.org/om/notify/anycast/exchange/topic.info", 1),
    ],
    ids=["rpc-multicast", "rpc-unicast", "rpc-anycast", "notify-anycast"],
)
def test_the_default_rules_serve_oslo_messaging_addresses(
    default_router: Router, prefix: str, copies: int
) -> None:
    messages = numbered("oslo", 6)
    exchange = run(Exchange(default_router.url, unique(prefix), messages, [ACCEPT, ACCEPT]))
    received = Counter(body for consumer in range(2) for body in exchange.bodies(consumer))
    assert received == Counter({m.body: copies for m in messages})


def test_configured_patterns_choose_the_distribution(router: Callable[[Config], Router]) -> None:
    patterned = router({"address": [{"pattern": "fleet/*/events/#", "distribution": "multicast"}]})
    messages = numbered("event", 4)
    matching = run(Exchange(patterned.url, "fleet/ship-7/events/engine.hot", messages, [ACCEPT, ACCEPT]))
    assert matching.bodies(0) == matching.bodies(1) == [m.body for m in messages]
    other = run(Exchange(patterned.url, "fleet/ship-7/orders", messages, [ACCEPT, ACCEPT]))
    assert Counter(other.bodies(0) + other.bodies(1)) == Counter(m.body for m in messages)  # balanced


class DynamicTarget(SenderOption):
    def apply(self, sender: Any) -> None:
        sender.target.dynamic = True


class DynamicSender(Client):
    """A sender asks for a dynamic target; a receiver then attaches to the address the router assigned."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.address: str | None = None
        self.received: list[object] = []
        self.sent = False

    def begin(self) -> None:
        self.sender = self.container.create_sender(
            self.connect(), None, name="producer", options=DynamicTarget()
        )

    def on_link_opened(self, event: Event) -> None:
        if the(event.link) == self.sender:
            self.address = self.sender.remote_target.address
            assert self.address, "the router did not echo an address for the dynamic target"
            self.container.create_receiver(self.connect(), self.address, name="consumer")

    def on_sendable(self, event: Event) -> None:
        if not self.sent:
            self.sent = True
            self.sender.send(Message(body="to the dynamic node"))

    def on_message(self, event: Event) -> None:
        self.received.append(the(event.message).body)

    def on_accepted(self, event: Event) -> None:
        self.done()


def test_a_sender_with_a_dynamic_target_gets_an_address(default_router: Router) -> None:
    client = run(DynamicSender(default_router.url))
    assert client.received == ["to the dynamic node"]
