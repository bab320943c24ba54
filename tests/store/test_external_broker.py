"""The external broker that can serve a queue address (issue 6): what RabbitMQ's AMQP 1.0 plugin does for
the router, pinned with python-qpid-proton clients behaving as the router's links to it will; then queue
addresses served by it through real routers (meshbus.amqp.broker), some through a `Relay` the test can
hold or cut between the router and the broker.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from proton import Condition, Delivery, Disposition, Event, Link, Message, Terminus, Timeout
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, SendException

from tests.conftest import Config, Router
from tests.integration.clients import Client, run, the
from tests.integration.test_pools import InPool
from tests.mesh_routers.conftest import INTER_ROUTER_LISTENER, TIMERS

if TYPE_CHECKING:
    from tests.broker import Broker

Start = Callable[[Config], Router]

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


# -- queue addresses served through the router by the broker ------------------------------------------------

BROKER_OPEN = r"broker rabbit at \S+: connection open"
WAIT = 20.0  # seconds: generous, for a busy machine


def broker_config(host: str, port: int) -> dict[str, Any]:
    """A router whose queues under `jobs/` live on the broker named rabbit."""
    return {
        "connector": [{"role": "broker", "name": "rabbit", "host": host, "port": port}],
        "queue": [{"prefix": "jobs", "broker": "rabbit"}],
    }


def started_with_broker(router: Start, broker: Broker) -> Router:
    started = router(broker_config(broker.host, broker.port))
    assert started.wait_for_log(BROKER_OPEN, WAIT) is not None, "the router did not reach the broker"
    return started


def queue_address() -> str:
    # '/' and '.' in the queue's name: the router writes '/' as %2F for RabbitMQ.
    return f"jobs/test.{uuid.uuid4().hex[:12]}"


def receive(url: str, address: str, count: int, pool: str | None = None) -> list[Message]:
    """Receive and accept `count` messages from `address`, then stop."""
    connection = BlockingConnection(url, timeout=WAIT)
    try:
        receiver = connection.create_receiver(address, credit=count, options=InPool(pool) if pool else None)
        received = []
        for _ in range(count):
            received.append(receiver.receive(WAIT))
            receiver.accept()
        return received
    finally:
        connection.close()


def test_messages_sent_before_any_consumer_stay_on_the_broker_until_consumed(
    rabbitmq_amqp: Broker, router: Start
) -> None:
    address = queue_address()
    first = started_with_broker(router, rabbitmq_amqp)
    connection = BlockingConnection(first.url, timeout=WAIT)
    sender = connection.create_sender(address)
    for n in range(COUNT):
        sender.send(Message(body=f"message-{n}", durable=True))  # raises unless accepted: by the broker
    connection.close()
    first.stop()
    # The router's store took none of them.
    assert re.search(r"store \S+ closed: stored=0 ", first.log()), first.log()

    # Another router, with a store of its own (empty): the messages come from the broker.
    second = started_with_broker(router, rabbitmq_amqp)
    connection = BlockingConnection(second.url, timeout=WAIT)
    try:
        receiver = connection.create_receiver(address, credit=COUNT)
        released = receiver.receive(WAIT)
        receiver.release(delivered=True)  # modified, delivery-failed: sent to RabbitMQ as released
        bodies = []
        for _ in range(COUNT):
            bodies.append(receiver.receive(WAIT).body)
            receiver.accept()
    finally:
        connection.close()
    assert Counter(bodies) == Counter(f"message-{n}" for n in range(COUNT))
    assert released.body in bodies  # redelivered by the broker


def test_pools_of_a_broker_queue_share_its_messages(rabbitmq_amqp: Broker, router: Start) -> None:
    address = queue_address()
    served = started_with_broker(router, rabbitmq_amqp)
    connection = BlockingConnection(served.url, timeout=WAIT)
    sender = connection.create_sender(address)
    for n in range(COUNT):
        sender.send(Message(body=f"message-{n}", durable=True))
    connection.close()
    # A broker queue is one group: one pool takes some, the other the rest, each message once.
    bodies = [m.body for m in receive(served.url, address, COUNT // 2, pool="a")]
    bodies += [m.body for m in receive(served.url, address, COUNT - COUNT // 2, pool="b")]
    assert Counter(bodies) == Counter(f"message-{n}" for n in range(COUNT))
    assert served.wait_for_log(r"pool 'a' of queue '.*' shares the messages of broker rabbit", WAIT)


def test_nothing_is_accepted_while_the_broker_is_unreachable_and_all_once_it_is_up(
    rabbitmq_amqp: Broker, router: Start
) -> None:
    port = free_port()
    unreachable = router(broker_config("127.0.0.1", port))
    assert unreachable.wait_for_log(rf"broker rabbit at 127.0.0.1:{port}: .*; retrying", WAIT)
    address = queue_address()
    connection = BlockingConnection(unreachable.url, timeout=WAIT)
    try:
        # A link to the queue gets no credit while the broker is away; the anonymous relay's message is
        # given back, not accepted by a router that cannot keep it.
        sender = connection.create_sender(None)
        with pytest.raises(SendException) as refused:
            sender.send(Message(address=address, body="kept nowhere", durable=True))
        assert refused.value.state == Disposition.RELEASED
        with Relay(rabbitmq_amqp.host, rabbitmq_amqp.port, port):  # the broker is up at last
            assert unreachable.wait_for_log(BROKER_OPEN, WAIT)
            queue = connection.create_sender(address)
            queue.send(Message(body="kept on the broker", durable=True))
            assert [m.body for m in receive(unreachable.url, address, 1)] == ["kept on the broker"]
    finally:
        connection.close()


def test_links_to_the_broker_are_attached_again_after_a_connection_loss(
    rabbitmq_amqp: Broker, router: Start
) -> None:
    address = queue_address()
    with Relay(rabbitmq_amqp.host, rabbitmq_amqp.port) as relay:
        served = router(broker_config("127.0.0.1", relay.port))
        assert served.wait_for_log(BROKER_OPEN, WAIT) is not None
        consuming = BlockingConnection(served.url, timeout=WAIT)
        producing = BlockingConnection(served.url, timeout=WAIT)
        try:
            receiver = consuming.create_receiver(address, credit=COUNT)
            sender = producing.create_sender(address)
            received: list[str] = []
            for half in range(2):
                mark = served.mark()
                sent = {f"message-{half}-{n}" for n in range(COUNT // 2)}
                for body in sent:
                    sender.send(Message(body=body, durable=True))
                # At least once: what was accepted just before the loss may come again after it.
                while not sent <= set(received):
                    received.append(str(receiver.receive(WAIT).body))
                    receiver.accept()
                if half == 0:
                    relay.cut()
                    assert served.wait_for_log(r"broker rabbit at \S+: connection lost", WAIT, mark)
                    assert served.wait_for_log(BROKER_OPEN, WAIT, mark)
        finally:
            consuming.close()
            producing.close()
    again = [body for body, times in Counter(received).items() if times > 1]
    assert all(body.startswith("message-0-") for body in again), again


def test_a_router_of_the_mesh_without_the_broker_reaches_its_queues(
    rabbitmq_amqp: Broker, router: Start
) -> None:
    # B serves jobs/ through the broker; A has the rule, no store, no broker: it routes jobs/ to B.
    b = router(
        {
            **broker_config(rabbitmq_amqp.host, rabbitmq_amqp.port),
            "router": {"id": "B"},
            "mesh": TIMERS,
            "listener": [{}, {"role": "inter-router"}],
        }
    )
    found = b.wait_for_log(INTER_ROUTER_LISTENER, WAIT)
    assert found is not None and b.wait_for_log(BROKER_OPEN, WAIT)
    a = router(
        {
            "router": {"id": "A"},
            "mesh": TIMERS,
            "store": {"enabled": False},
            "queue": [{"prefix": "jobs"}],
            "connector": [{"host": found.group(1), "port": int(found.group(2)), "role": "inter-router"}],
        }
    )
    address = queue_address()
    connection = BlockingConnection(a.url, timeout=WAIT)
    try:
        sender = connection.create_sender(address)  # credit once A knows B serves jobs/
        for n in range(COUNT):
            sender.send(Message(body=f"message-{n}", durable=True))
    finally:
        connection.close()
    bodies = [m.body for m in receive(a.url, address, COUNT)]
    assert Counter(bodies) == Counter(f"message-{n}" for n in range(COUNT))


def test_a_message_is_accepted_only_once_the_broker_accepted_it(rabbitmq_amqp: Broker, router: Start) -> None:
    with Relay(rabbitmq_amqp.host, rabbitmq_amqp.port) as relay:
        served = router(broker_config("127.0.0.1", relay.port))
        assert served.wait_for_log(BROKER_OPEN, WAIT) is not None
        connection = BlockingConnection(served.url, timeout=WAIT)
        try:
            sender = connection.create_sender(queue_address())
            sender.send(Message(body="first", durable=True))  # the link to the broker is up, with credit
            relay.hold()  # nothing the broker says reaches the router
            delivery = sender.link.send(Message(body="second", durable=True))
            assert isinstance(delivery, Delivery)
            with pytest.raises(Timeout):
                connection.wait(lambda: delivery.settled, timeout=0.5)
            relay.release()
            connection.wait(lambda: delivery.settled, timeout=WAIT)
        finally:
            connection.close()
    assert delivery.remote_state == Disposition.ACCEPTED


class Relay:
    """A TCP relay on 127.0.0.1 to the broker, whose connections the test can cut."""

    def __init__(self, host: str, port: int, listen: int = 0) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", listen))
        self.port = int(self.server.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.flowing = threading.Event()  # cleared: what the broker sends waits in the relay
        self.flowing.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return  # closed
            far = socket.create_connection(self.target)
            for sock in (near, far):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )  # the router's latency, not Nagle's
            self.sockets += [near, far]
            for source, sink, gate in ((near, far, None), (far, near, self.flowing)):
                threading.Thread(target=_pump, args=(source, sink, gate), daemon=True).start()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sockets = []

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_: object) -> None:
        self.server.close()
        self.cut()


def _pump(source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            if gate is not None:
                gate.wait()
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_RDWR)


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (for a broker that is not there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
