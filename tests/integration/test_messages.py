"""Large messages through a real router: streamed intact, aborted, or refused over the size limit."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from proton import Delivery, Event, Message

from tests.conftest import Config, Router
from tests.integration.clients import Client, Exchange, run, the, unique

MiB = 1 << 20


def test_a_10_mib_message_passes_intact(default_router: Router) -> None:
    payload = random.Random(10).randbytes(10 * MiB)
    exchange = run(Exchange(default_router.url, unique("test/large"), [Message(body=payload)]))
    [received] = exchange.bodies(0)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert [o.name for o in exchange.settled_outcomes()] == ["accepted"]


def test_max_message_size_refuses_a_larger_message(router: Callable[[Config], Router]) -> None:
    limited = router({"listener": [{"max_message_size": MiB}]})
    messages = [Message(body=b"small" * 100), Message(body=bytes(2 * MiB)), Message(body=b"after")]
    exchange = run(Exchange(limited.url, unique("test/limited"), messages))
    assert exchange.producer.remote_max_message_size == MiB, "the attach does not announce the limit"
    assert exchange.bodies(0) == [b"small" * 100, b"after"]
    small, large, after = exchange.settled_outcomes()
    assert (small.name, after.name) == ("accepted", "accepted")
    assert large.name == "rejected"
    assert large.condition is not None and large.condition.name == "amqp:link:message-size-exceeded"


class AbortMidway(Client):
    """The producer streams the first part of a large message, aborts it once the consumer is receiving it,
    then sends a small message on the same link."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url)
        self.address = address
        self.aborted = 0
        self.received: list[object] = []
        self.streaming: Delivery | None = None  # the delivery to abort, until it is aborted
        self.started = False

    def begin(self) -> None:
        self.receiver = self.container.create_receiver(self.connect(), self.address, name="consumer")
        self.sender = self.container.create_sender(self.connect(), self.address, name="producer")

    def on_sendable(self, event: Event) -> None:
        if not self.started:
            self.started = True
            encoded = Message(body=bytes(MiB)).encode()
            self.streaming = self.sender.delivery(self.sender.delivery_tag())
            self.sender.stream(encoded[: len(encoded) // 4])

    def on_delivery(self, event: Event) -> None:
        delivery = the(event.delivery)
        if delivery.link == self.receiver and delivery.partial and self.streaming is not None:
            self.streaming.abort()
            self.streaming = None
            self.sender.send(Message(body="after"))

    def on_aborted(self, event: Event) -> None:
        self.aborted += 1

    def on_message(self, event: Event) -> None:
        self.received.append(the(event.message).body)

    def on_accepted(self, event: Event) -> None:
        self.done()


def test_an_aborted_delivery_is_aborted_downstream(default_router: Router) -> None:
    client = run(AbortMidway(default_router.url, unique("test/abort")))
    assert client.aborted == 1
    assert client.received == ["after"]
