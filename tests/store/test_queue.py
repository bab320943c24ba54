"""The queue logic driven with events: appends, commits, attaches, credit, settlements, detaches, time.

No file and no clock: a `MemoryJournal` stands for the engine, and `now` is a number the test moves.
"""

from __future__ import annotations

from collections import Counter

import pytest

from meshbus.store.queue import (
    DEFAULT_GROUP,
    DeadLetter,
    Delivery,
    Queue,
    QueueFull,
    QueueLimits,
    Settlement,
)
from tests.store.journal import MemoryJournal

NOW = 1_700_000_000.0
ACCEPTED = Settlement.ACCEPTED
RELEASED = Settlement.RELEASED
MODIFIED = Settlement.MODIFIED
REJECTED = Settlement.REJECTED


def make_queue(**limits: object) -> tuple[Queue, MemoryJournal]:
    journal = MemoryJournal()
    return Queue("notify/q", QueueLimits(**limits), journal), journal  # type: ignore[arg-type]


def fill(queue: Queue, count: int, deadline: float | None = None) -> None:
    """Append `count` messages (payload: their number) and make them durable."""
    for _ in range(count):
        queue.append(b"%d" % queue.next_offset, deadline, NOW)
    queue.durable(queue.next_offset)


def take(queue: Queue, now: float = NOW) -> list[tuple[object, int]]:
    return [(d.consumer, d.message.offset) for d in queue.deliveries(now)]


def test_each_group_gets_every_message_and_members_share() -> None:
    queue, _ = make_queue()
    queue.attach("a1", "a")
    queue.attach("a2", "a")
    queue.attach("b1", "b")
    fill(queue, 6)
    for consumer in ("a1", "a2", "b1"):
        queue.flow(consumer, 10)
    handed = queue.deliveries(NOW)
    by_group: dict[str, list[int]] = {}
    for delivery in handed:
        by_group.setdefault(delivery.group, []).append(delivery.message.offset)
    assert by_group == {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3, 4, 5]}
    shares = Counter(d.consumer for d in handed if d.group == "a")
    assert shares == {"a1": 3, "a2": 3}


def test_a_message_is_deleted_once_every_group_accepted_it() -> None:
    queue, journal = make_queue()
    queue.attach("a1", "a")
    queue.attach("b1", "b")
    fill(queue, 1)
    queue.flow("a1", 1)
    queue.flow("b1", 1)
    take(queue)
    queue.settle("a1", 0, ACCEPTED, NOW)
    assert queue.depth == 1 and ("finished", "a", 0) in journal.calls
    queue.settle("b1", 0, ACCEPTED, NOW)
    assert queue.depth == 0 and queue.bytes == 0 and journal.messages == {}


def test_the_first_group_starts_at_the_oldest_message_later_ones_at_the_tail() -> None:
    queue, _ = make_queue()
    fill(queue, 3)  # sent before any listener existed
    queue.attach("first", "a")
    queue.attach("late", "b")
    fill(queue, 2)
    queue.flow("first", 10)
    queue.flow("late", 10)
    handed = take(queue)
    assert [o for c, o in handed if c == "first"] == [0, 1, 2, 3, 4]
    assert [o for c, o in handed if c == "late"] == [3, 4]


def test_a_group_outlives_its_consumers() -> None:
    queue, _ = make_queue()
    queue.attach("c1")
    queue.detach("c1", NOW)
    fill(queue, 2)  # sent while the pool's only listener restarts
    queue.attach("c2")
    queue.flow("c2", 10)
    assert take(queue) == [("c2", 0), ("c2", 1)]


def test_a_message_in_memory_is_handed_out_at_once_one_read_back_only_once_durable() -> None:
    queue, _ = make_queue(cache_bytes=1)
    queue.attach("c")
    queue.flow("c", 10)
    queue.append(b"x", None, NOW)  # fits the payload cache
    queue.append(b"y", None, NOW)  # the cache is full: its payload is read back from the file
    queue.append(b"z", None, NOW)
    assert take(queue) == [("c", 0)]
    queue.durable(2)
    assert take(queue) == [("c", 1)], "in order: the next one is not written yet"
    queue.durable(3)
    assert take(queue) == [("c", 2)]


def test_a_consumer_gets_no_more_than_its_credit() -> None:
    queue, _ = make_queue()
    queue.attach("c")
    fill(queue, 5)
    queue.flow("c", 2)
    assert take(queue) == [("c", 0), ("c", 1)]
    assert take(queue) == []
    queue.flow("c", 1)
    assert take(queue) == [("c", 2)]


def test_released_and_modified_come_back_first_with_the_count_raised() -> None:
    queue, journal = make_queue()
    queue.attach("c")
    fill(queue, 4)
    queue.flow("c", 3)
    take(queue)
    queue.settle("c", 2, RELEASED, NOW)
    queue.settle("c", 1, MODIFIED, NOW)
    queue.flow("c", 3)
    handed = queue.deliveries(NOW)
    assert [(d.message.offset, d.count) for d in handed] == [(1, 1), (2, 1), (3, 0)]
    assert ("failed", DEFAULT_GROUP, 2, 1) in journal.calls
    queue.settle("c", 1, RELEASED, NOW)
    queue.flow("c", 1)
    assert [(d.message.offset, d.count) for d in queue.deliveries(NOW)] == [(1, 2)]


def test_a_detaching_consumer_returns_what_it_held_to_its_group() -> None:
    queue, _ = make_queue()
    queue.attach("c1", "pool")
    queue.attach("c2", "pool")
    fill(queue, 2)
    queue.flow("c1", 2)
    take(queue)
    queue.detach("c1", NOW)
    queue.flow("c2", 5)
    assert [(d.consumer, d.message.offset, d.count) for d in queue.deliveries(NOW)] == [
        ("c2", 0, 1),
        ("c2", 1, 1),
    ]


def test_over_the_delivery_limit_a_message_is_dead_lettered_for_its_group_only() -> None:
    queue, _ = make_queue(max_deliveries=2, dead_letter="dead")
    queue.attach("a1", "a")
    queue.attach("b1", "b")
    fill(queue, 1)
    queue.flow("a1", 5)
    queue.flow("b1", 5)
    take(queue)
    assert queue.settle("a1", 0, RELEASED, NOW) is None  # count 1: back to the group
    assert take(queue) == [("a1", 0)]
    letter = queue.settle("a1", 0, RELEASED, NOW)
    assert isinstance(letter, DeadLetter)
    assert (letter.address, letter.source, letter.group, letter.count) == ("dead", "notify/q", "a", 2)
    assert letter.message.payload == b"0" and "failed 2 times" in letter.reason
    assert take(queue) == []  # not for group a any more
    assert queue.depth == 1  # group b still holds it
    queue.settle("b1", 0, ACCEPTED, NOW)
    assert queue.depth == 0


def test_rejected_is_dead_lettered_at_once_or_dropped_without_an_address() -> None:
    queue, _ = make_queue(dead_letter="dead")
    queue.attach("c")
    fill(queue, 1)
    queue.flow("c", 1)
    take(queue)
    letter = queue.settle("c", 0, REJECTED, NOW)
    assert letter is not None and letter.reason == "rejected by a consumer" and letter.count == 0
    assert queue.depth == 0

    queue, _ = make_queue()  # no dead-letter address
    queue.attach("c")
    fill(queue, 1)
    queue.flow("c", 1)
    take(queue)
    assert queue.settle("c", 0, REJECTED, NOW) is None
    assert queue.depth == 0 and queue.counters.dead_lettered == 1


def test_expired_messages_are_never_delivered_and_are_purged() -> None:
    queue, journal = make_queue()
    assert queue.append(b"late", NOW - 1, NOW) is None  # expired on arrival: not stored
    queue.append(b"short", NOW + 1, NOW)
    queue.append(b"long", NOW + 100, NOW)
    queue.durable(queue.next_offset)
    assert queue.next_deadline() == NOW + 1
    assert queue.expire(NOW + 2) == 1
    assert [m.payload for m in queue.messages()] == [b"long"] and list(journal.messages) == [1]
    queue.attach("c")
    queue.flow("c", 5)
    assert take(queue, NOW + 200) == []  # expired while waiting: skipped and deleted
    assert queue.depth == 0 and queue.counters.expired == 3


def test_a_message_expiring_in_flight_goes_when_settled() -> None:
    queue, _ = make_queue()
    queue.attach("c")
    queue.append(b"x", NOW + 1, NOW)
    queue.durable(1)
    queue.flow("c", 1)
    take(queue)
    assert queue.expire(NOW + 5) == 0  # held by the consumer
    queue.settle("c", 0, RELEASED, NOW + 5)
    assert queue.depth == 0


def test_a_full_queue_refuses_with_a_clear_error() -> None:
    queue, _ = make_queue(max_depth=2, max_bytes=1000)
    fill(queue, 2)
    assert queue.room() == 0
    with pytest.raises(QueueFull, match=r"'notify/q' is full: it holds 2 messages.*raise its max_depth"):
        queue.append(b"x", None, NOW)
    assert queue.counters.refused == 1 and queue.depth == 2

    queue, _ = make_queue(max_bytes=10)
    queue.append(b"123456", None, NOW)
    assert queue.room() > 0
    with pytest.raises(QueueFull, match=r"a 5-byte message would take it past 10 bytes \(6 held\)") as caught:
        queue.append(b"12345", None, NOW)
    assert caught.value.condition == "amqp:resource-limit-exceeded" and caught.value.limit == "max_bytes"
    queue.append(b"1234", None, NOW)  # fits exactly
    assert queue.room() == 0


def test_dropping_a_group_deletes_what_only_it_needed() -> None:
    queue, journal = make_queue()
    queue.attach("a1", "a")
    queue.attach("b1", "b")
    fill(queue, 2)
    queue.flow("b1", 1)
    take(queue)
    queue.settle("b1", 0, ACCEPTED, NOW)
    queue.detach("a1", NOW)
    with pytest.raises(ValueError, match="group 'b' of queue 'notify/q' still has 1 consumers"):
        queue.drop_group("b")
    queue.drop_group("a")
    assert [m.offset for m in queue.messages()] == [1] and "a" not in journal.groups


def test_settlements_of_unknown_deliveries_are_ignored() -> None:
    queue, _ = make_queue()
    queue.attach("c")
    fill(queue, 1)
    queue.flow("c", 1)
    take(queue)
    queue.settle("c", 0, ACCEPTED, NOW)
    queue.settle("c", 0, RELEASED, NOW)  # settled twice
    queue.settle("ghost", 0, ACCEPTED, NOW)
    assert queue.depth == 0 and queue.counters.requeued == 0


def test_restore_gives_back_what_was_handed_out_with_the_count_raised() -> None:
    queue, journal = make_queue()
    queue.attach("a1", "a")
    queue.attach("b1", "b")
    fill(queue, 4)
    queue.flow("a1", 3)
    queue.flow("b1", 1)
    take(queue)
    queue.settle("a1", 0, ACCEPTED, NOW)  # a: 0 done, 1 and 2 in flight; b: 0 in flight
    queue.settle("a1", 1, RELEASED, NOW)

    journal.save_cursors()  # as the engine does with each batch
    restored = journal.restore("notify/q", QueueLimits())
    assert [m.offset for m in restored.messages()] == [0, 1, 2, 3]
    restored.attach("a2", "a")
    restored.attach("b2", "b")
    restored.flow("a2", 10)
    restored.flow("b2", 10)
    handed = restored.deliveries(NOW)
    assert [(d.group, d.message.offset, d.count) for d in handed if d.group == "a"] == [
        ("a", 1, 2),  # released once, then raised by the restart
        ("a", 2, 1),
        ("a", 3, 0),
    ]
    assert [(d.message.offset, d.count) for d in handed if d.group == "b"] == [(0, 1), (1, 0), (2, 0), (3, 0)]


def test_deliveries_name_group_and_message() -> None:
    queue, _ = make_queue()
    queue.attach("c", "pool")
    fill(queue, 1)
    queue.flow("c", 1)
    (delivery,) = queue.deliveries(NOW)
    assert delivery == Delivery("c", "pool", delivery.message, 0) and delivery.message.payload == b"0"


def test_restore_with_a_cursor_saved_before_the_last_deliveries_skips_what_was_finished() -> None:
    queue, journal = make_queue()
    queue.attach("a1", "a")
    queue.attach("b1", "b")
    journal.save_cursors()
    fill(queue, 2)
    queue.flow("a1", 2)
    take(queue)  # group a's cursor moves to 2, not saved before the restart
    queue.settle("a1", 1, ACCEPTED, NOW)  # kept for b: marked finished for a

    restored = journal.restore("notify/q", QueueLimits())
    restored.attach("a2", "a")
    restored.flow("a2", 10)
    assert [(d.message.offset, d.count) for d in restored.deliveries(NOW)] == [(0, 0)]
