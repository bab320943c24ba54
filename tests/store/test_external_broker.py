"""The external broker that can serve a queue address (issue 6): what RabbitMQ's AMQP 1.0 plugin does for
the router, pinned with python-qpid-proton clients behaving as the router's links to it will.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proton import Condition, Disposition, Event, Link, Message, Terminus
from proton.reactor import LinkOption

from tests.integration.clients import Client, run, the

if TYPE_CHECKING:
    from tests.broker import Broker

pytest_plugins = ["tests.broker"]  # the rabbitmq_amqp fixture

COUNT = 100


class Durable(LinkOption):
    """A durable terminus (a sender's target, a receiver's source): the plugin declares the queue durable,
    and refuses a link asking for a non-durable one once it is."""

    def apply(self, link: Link) -> None:
        terminus = link.target if link.is_sender else link.source
        terminus.durability = Terminus.CONFIGURATION


@dataclass(frozen=True, slots=True)
class Received:
    body: str
    delivery_count: int
    first_acquirer: bool


class StoreThenConsume(Client):
    """1. Sends COUNT durable messages, unsettled, to `address` through a durable target.
    2. Once every one is settled, a consumer attaches with a durable source, releases the first message it
       gets and accepts every message it gets after that.
    3. Once all are accepted, a sender attaches with a non-durable target, on a connection of its own; the
       client is done when the broker ends that sender's session."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url, prefetch=COUNT, auto_accept=False)
        self.address = address
        self.sent = 0
        self.outcomes: list[int] = []
        self.received: list[Received] = []
        self.accepted: list[str] = []
        self.refusal: Condition | None = None

    def begin(self) -> None:
        self.connection = self.connect()
        self.container.create_sender(self.connection, self.address, options=Durable())

    def on_sendable(self, event: Event) -> None:
        sender = the(event.sender)
        while sender.credit > 0 and self.sent < COUNT:
            sender.send(Message(body=f"message-{self.sent}", durable=True))
            self.sent += 1

    def on_settled(self, event: Event) -> None:
        self.outcomes.append(the(event.delivery).remote_state)
        if len(self.outcomes) == COUNT:
            self.container.create_receiver(self.connection, self.address, options=Durable())

    def on_message(self, event: Event) -> None:
        message, delivery = event.message, the(event.delivery)
        self.received.append(Received(message.body, message.delivery_count, message.first_acquirer))
        if len(self.received) == 1:
            self.release(delivery, delivered=False)
            return
        self.accept(delivery)
        self.accepted.append(message.body)
        if len(self.accepted) == COUNT:
            self.container.create_sender(self.connect(), self.address)

    def on_session_error(self, event: Event) -> None:
        if len(self.accepted) < COUNT:
            super().on_session_error(event)
        else:
            self.refusal = the(event.session).remote_condition
            self.done()


def test_queue_keeps_durable_messages_until_accepted(rabbitmq_amqp: Broker) -> None:
    client = run(StoreThenConsume(rabbitmq_amqp.url, f"/queue/meshbus-test-{uuid.uuid4().hex[:12]}"))

    assert client.outcomes == [Disposition.ACCEPTED] * COUNT
    assert Counter(client.accepted) == Counter(f"message-{n}" for n in range(COUNT))
    # The released message came back once; only first-acquirer says it was delivered before.
    first, *later = client.received
    assert first.first_acquirer
    assert [again for again in later if again.body == first.body] == [
        Received(first.body, delivery_count=0, first_acquirer=False)
    ]
    # The durable target made a durable queue: asking for a non-durable one now is refused.
    assert client.refusal is not None and client.refusal.name == "amqp:precondition-failed"
    assert "durable" in str(client.refusal.description)
