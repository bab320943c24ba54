"""The store's endpoint between a real router core (with a recording edge for the clients' links) and a real
store file, its group commits driven by hand: no sockets, no event loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from proton import Message

from meshbus.router.addressing import DistributionRules, QueueRule, QueueRules
from meshbus.router.core import ACCEPTED, REJECTED_KIND, RELEASED, Delivery, RouterCore
from meshbus.store.endpoint import INTAKE_WINDOW, StoreEndpoint
from meshbus.store.queue import QueueLimits
from meshbus.store.store import Store
from tests.router.conftest import CAPACITY, NOW, RecordingEdge

RULE = QueueRule(prefix="q")


class Fixture:
    def __init__(self, path: Path, max_depth: int = 100, commit_delay: float = 0.0) -> None:
        self.edge = RecordingEdge()
        self.core = RouterCore(self.edge, DistributionRules([]), "test", "1", QueueRules([RULE]))
        limits = QueueLimits(max_depth=max_depth)
        self.store = Store.open(path, lambda address: limits, commit_delay=commit_delay)
        self.wakes = 0
        self.endpoint = StoreEndpoint(self.store, self.core, [RULE], lambda: NOW, self.wake)
        self.endpoint.start()

    def wake(self) -> None:
        self.wakes += 1

    def commit(self) -> None:
        """One group commit, as the store host runs it."""
        batch = self.store.seal()
        if batch is not None:
            self.store.write(batch)
            self.endpoint.committed(batch)
        self.endpoint.turn()

    def send(self, address: str, body: str) -> Delivery:
        producer = self.core.attach_producer(object(), address, CAPACITY)
        payload = Message(body=body).encode()
        return self.core.deliver(
            producer, object(), payload, complete=True, settled=False, to=None, deadline=None, now=NOW
        )


@pytest.fixture
def fixture(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path / "store.db")


def test_a_producer_is_accepted_only_once_its_message_is_written(fixture: Fixture) -> None:
    delivery = fixture.send("q/a", "m")
    fixture.endpoint.turn()
    assert fixture.edge.settles == [], "not durable yet: no outcome"
    fixture.commit()
    assert fixture.edge.outcome(delivery) == ACCEPTED
    assert fixture.store.queues["q/a"].depth == 1


def test_the_store_link_credit_is_what_the_store_allows(tmp_path: Path) -> None:
    roomy = Fixture(tmp_path / "roomy.db", max_depth=10 * INTAKE_WINDOW)
    roomy.send("q/a", "m")
    intake = roomy.endpoint.intake["q/a"]
    assert intake.credit == INTAKE_WINDOW - 1
    roomy.commit()
    assert intake.credit == INTAKE_WINDOW, "reviewed at the commit's turn"
    assert "_store/prefix:q" in roomy.core.entries, "the router advertises the rule it stores"
    small = Fixture(tmp_path / "small.db", max_depth=3)
    small.send("q/a", "m")
    small.commit()
    assert small.endpoint.intake["q/a"].credit == 2, "capped by the queue's room"


def test_a_consumer_that_keeps_up_keeps_producers_going_with_nothing_written(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "store.db", commit_delay=1.0)
    consumer = fixture.core.attach_consumer(object(), "q/a")
    fixture.commit()  # the queue and its group
    for index in range(INTAKE_WINDOW + 10):  # past the intake's first credit: more comes without commits
        fixture.core.consumer_credit(consumer, 1, False, NOW)
        delivery = fixture.send("q/a", f"m{index}")
        fixture.endpoint.turn()
        assert fixture.store.commit_due(NOW) == pytest.approx(1.0), "the consumer holds its message"
        (sent,) = fixture.edge.sent_to(consumer)[-1:]
        fixture.core.consumer_outcome(consumer, fixture.edge.handle(consumer, sent), ACCEPTED, True)
        fixture.endpoint.turn()
        assert fixture.edge.outcome(delivery) == ACCEPTED, f"message {index}: accepted once consumed"
    assert fixture.store.commit_due(NOW) is None, "nothing worth a commit"
    assert fixture.store.queues["q/a"].depth == 0


def test_a_full_queue_refuses_with_resource_limit_exceeded(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "store.db", max_depth=1)
    fixture.send("q/a", "kept")
    refused = fixture.send("q/a", "refused")
    fixture.commit()
    outcome = fixture.edge.outcome(refused)
    assert outcome.kind == REJECTED_KIND and outcome.error is not None
    assert outcome.error[0] == "amqp:resource-limit-exceeded"
    assert "queue 'q/a' is full: it holds 1 messages" in outcome.error[1]


def test_consumers_get_stored_messages_and_a_released_one_again_with_its_count(fixture: Fixture) -> None:
    fixture.send("q/a", "m")
    fixture.commit()
    consumer = fixture.core.attach_consumer(object(), "q/a")
    assert consumer.address == "_queue/-/q/a"
    fixture.core.consumer_credit(consumer, 10, False, NOW)
    fixture.endpoint.turn()
    (first,) = fixture.edge.sent_to(consumer)
    fixture.core.consumer_outcome(consumer, fixture.edge.handle(consumer, first), RELEASED, True)
    fixture.endpoint.turn()
    first_again, second = fixture.edge.sent_to(consumer)
    assert first_again is first
    decoded = Message()
    decoded.decode(bytes(second.payload))
    assert (decoded.body, decoded.delivery_count) == ("m", 1)
    fixture.core.consumer_outcome(consumer, fixture.edge.handle(consumer, second), ACCEPTED, True)
    fixture.commit()
    assert fixture.store.queues["q/a"].depth == 0


def test_a_consumer_going_away_gives_back_what_it_held(fixture: Fixture) -> None:
    fixture.send("q/a", "m")
    fixture.commit()
    consumer = fixture.core.attach_consumer(object(), "q/a", pool="audit")
    fixture.core.consumer_credit(consumer, 10, False, NOW)
    fixture.endpoint.turn()
    assert len(fixture.edge.sent_to(consumer)) == 1
    fixture.core.detach_consumer(consumer, NOW)
    assert fixture.endpoint.outlets == {}
    again = fixture.core.attach_consumer(object(), "q/a", pool="audit")
    fixture.core.consumer_credit(again, 10, False, NOW)
    fixture.endpoint.turn()
    (redelivered,) = fixture.edge.sent_to(again)
    decoded = Message()
    decoded.decode(bytes(redelivered.payload))
    assert decoded.delivery_count == 1
