"""Queues through a real router with its embedded store: notifications kept for listeners to come, pools,
requeue with the delivery count raised, expiry, a full queue refusing, and dead letters.

Each test starts its own router (`router` fixture), so its store is a file of the test's own.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from proton import Message
from proton.utils import BlockingConnection

from meshbus.messaging import (
    MessageDeliveryFailure,
    NotificationListener,
    NotificationResult,
    Notifier,
    Target,
    Transport,
)
from meshbus.messaging.wire import notify_address
from tests.conftest import Config, Router
from tests.integration.test_pools import InPool
from tests.messaging.conftest import WAIT, Inbox

Start = Callable[[Config], Router]


class Listening:
    """An info endpoint recording payloads; with `requeue_first`, asks for each notification once more."""

    def __init__(self, requeue_first: bool = False) -> None:
        self.inbox = Inbox()
        self.requeue_first = requeue_first

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> str:
        first = payload not in self.inbox.items
        self.inbox.put(payload)
        return NotificationResult.REQUEUE if first and self.requeue_first else NotificationResult.HANDLED


@pytest.fixture
def transports() -> Any:
    opened: list[Transport] = []

    def open_transport(url: str) -> Transport:
        opened.append(Transport(url))
        return opened[-1]

    yield open_transport
    for transport in opened:
        transport.close()


@pytest.fixture
def listeners() -> Any:
    started: list[NotificationListener] = []

    def start(transport: Transport, topic: str, endpoint: object, **options: Any) -> NotificationListener:
        listener = NotificationListener(transport, [Target(topic=topic)], [endpoint], **options)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()
        listener.wait()


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_notifications_sent_before_any_listener_are_all_delivered_to_the_first(
    router: Start, transports: Any, listeners: Any, sync: str
) -> None:
    started = router({"store": {"sync": sync}})
    assert f"(sync {sync})" in started.log(), "the store opens with the configured sync"
    url = started.url
    notifier = Notifier(transports(url), "early", topics=["early"])
    for n in range(50):
        notifier.info({}, "stored", n)
    notifier.flush()  # all stored: nobody listens yet
    endpoint = Listening()
    listeners(transports(url), "early", endpoint)
    assert endpoint.inbox.wait_for(50) == list(range(50))


def test_notifications_a_listener_accepts_before_their_commit_are_never_written(
    router: Start, transports: Any, listeners: Any
) -> None:
    started = router({"store": {"commit_delay": 1.0}})
    endpoint = Listening()
    listeners(transports(started.url), "quick", endpoint)
    notifier = Notifier(transports(started.url), "q", topics=["quick"])
    for n in range(50):
        notifier.info({}, "e", n)
    notifier.flush()  # all accepted by the listener, long before any commit
    assert endpoint.inbox.wait_for(50) == list(range(50))
    started.stop()
    assert "stored=50 refused=0 failed=0 consumed_unwritten=50" in started.log()


def test_each_pool_gets_every_notification_and_its_members_share_them(
    router: Start, transports: Any, listeners: Any
) -> None:
    url = router({}).url
    members = {(pool, i): Listening() for pool in ("audit", "billing") for i in (1, 2)}
    for (pool, _), endpoint in members.items():
        listeners(transports(url), "pools", endpoint, pool=pool, credit=2)
    notifier = Notifier(transports(url), "p", topics=["pools"])
    for n in range(40):
        notifier.info({}, "e", n)
    for pool in ("audit", "billing"):
        deadline = time.monotonic() + WAIT
        shares: list[list[Any]] = []
        while time.monotonic() < deadline:
            shares = [members[pool, i].inbox.items for i in (1, 2)]
            if len(shares[0]) + len(shares[1]) >= 40:
                break
            time.sleep(0.01)
        assert sorted(shares[0] + shares[1]) == list(range(40)), f"pool {pool} did not get each once"
        assert all(shares), f"the members of pool {pool} do not share: {shares}"


def test_a_requeued_notification_comes_again_with_its_delivery_count_raised(
    router: Start, transports: Any, listeners: Any
) -> None:
    url = router({}).url
    endpoint = Listening(requeue_first=True)
    listeners(transports(url), "requeue", endpoint, allow_requeue=True)
    Notifier(transports(url), "p", topics=["requeue"]).info({}, "e", "again")
    assert endpoint.inbox.wait_for(2) == ["again", "again"]
    # The delivery count, as a plain AMQP consumer sees it.
    address = notify_address(Target(topic="counted"), "info")
    connection = BlockingConnection(url, timeout=WAIT)
    try:
        connection.create_sender(address).send(Message(body="counted"))
        receiver = connection.create_receiver(address)
        counts = []
        for _ in range(3):
            message = receiver.receive(timeout=WAIT)
            counts.append(message.delivery_count)
            receiver.release(delivered=True)  # modified, delivery-failed
        assert counts == [0, 1, 2]
        assert receiver.receive(timeout=WAIT).body == "counted"
        receiver.accept()
    finally:
        connection.close()


def test_an_expired_message_is_never_delivered(router: Start) -> None:
    url = router({}).url
    address = notify_address(Target(topic="expiring"), "info")
    connection = BlockingConnection(url, timeout=WAIT)
    try:
        sender = connection.create_sender(address)
        sender.send(Message(body="short-lived", ttl=0.2))
        sender.send(Message(body="kept", ttl=60))
        time.sleep(0.4)
        sender.send(Message(body="later"))
        receiver = connection.create_receiver(address)
        bodies = [receiver.receive(timeout=WAIT).body for _ in range(2)]
        receiver.accept()
        assert bodies == ["kept", "later"]
    finally:
        connection.close()


SMALL_QUEUE: Config = {
    "queue": [{"prefix": "openstack.org/om/notify/anycast/openstack/small", "max_depth": 3}],
}


def test_a_full_queue_refuses_with_an_error_the_notifier_logs_and_flush_raises(
    router: Start, transports: Any, caplog: pytest.LogCaptureFixture
) -> None:
    started = router(SMALL_QUEUE)
    notifier = Notifier(transports(started.url), "p", topics=["small"])
    for n in range(3):
        notifier.info({}, "e", n)
    notifier.flush()
    notifier.info({}, "e", 3)  # on its way: the refusal comes later
    with pytest.raises(MessageDeliveryFailure) as refused:
        notifier.flush()
    assert [r.getMessage() for r in caplog.records if r.name == "meshbus.messaging"] == [
        f"a message sent in the background was not taken: {refused.value}"
    ]
    notifier.flush()  # raised once: the next flush has nothing new to report
    message = str(refused.value)
    assert "amqp:resource-limit-exceeded" in message
    assert "openstack/small.info' is full: it holds 3 messages" in message
    assert "max_depth" in message
    assert started.wait_for_log(r"WARNING meshbus.store: queue .*small.info' is full", WAIT)


DEAD_LETTERS: Config = {
    "queue": [
        {"prefix": "work", "max_deliveries": 2, "dead_letter": "dead/work"},
        {"prefix": "dead"},
    ],
}


def test_a_rejected_or_too_often_failed_message_goes_to_the_dead_letter_queue(router: Start) -> None:
    url = router(DEAD_LETTERS).url
    connection = BlockingConnection(url, timeout=WAIT)
    try:
        sender = connection.create_sender("work")
        sender.send(Message(body="rejected"))
        sender.send(Message(body="failing"))
        work = connection.create_receiver("work")
        assert work.receive(timeout=WAIT).body == "rejected"
        work.reject()
        for _ in range(2):
            assert work.receive(timeout=WAIT).body == "failing"
            work.release(delivered=True)
        dead = connection.create_receiver("dead/work", options=InPool("audit"))
        bodies = Counter(dead.receive(timeout=WAIT).body for _ in range(2))
        dead.accept()
        assert bodies == Counter(["rejected", "failing"])
    finally:
        connection.close()


def test_a_message_of_several_frames_is_stored_and_delivered_whole(router: Start) -> None:
    url = router({}).url
    address = notify_address(Target(topic="large"), "info")
    large = "".join(f"{n:08d}" for n in range(25_000))  # 200 KB: over the default 64 KiB frame
    connection = BlockingConnection(url, timeout=WAIT)
    try:
        sender = connection.create_sender(address)
        sender.send(Message(body=large))  # returns once accepted: stored
        sender.send(Message(body="small"))
        receiver = connection.create_receiver(address)
        assert [receiver.receive(timeout=WAIT).body for _ in range(2)] == [large, "small"]
        receiver.accept()
    finally:
        connection.close()


def test_a_second_router_on_a_store_in_use_does_not_start(router: Start, tmp_path: Path) -> None:
    shared: Config = {"store": {"path": str(tmp_path / "one.db")}}
    router(shared)
    with pytest.raises(RuntimeError, match=r"the store .*one\.db is in use by another router"):
        router(shared)
