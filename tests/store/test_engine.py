"""The engine and the store facade on a real SQLite file: group commit, durability tokens, payloads read
back, restart (recovery), dead letters, a failing disk, producer flow control."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshbus.store.engine import EngineFailed
from meshbus.store.queue import QueueLimits, Settlement
from meshbus.store.store import MAX_UNWRITTEN, Store

NOW = 1_700_000_000.0
QUEUE = "openstack.org/om/notify/anycast/nova/notifications.info"


def limits_for(address: str) -> QueueLimits:
    # No payload cache: every delivery after a restart or of a dead letter reads the file.
    return QueueLimits(max_deliveries=3, dead_letter=None if address == "dead" else "dead", cache_bytes=0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def sent(store: Store, consumer: str, credit: int = 100) -> list[tuple[int, int, bytes]]:
    store.flow(consumer, credit)
    return [(o.offset, o.count, o.payload) for o in store.deliveries(NOW) if o.consumer == consumer]


def test_messages_are_delivered_once_durable_and_tokens_say_when(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "c")
    assert store.append(QUEUE, b"one", None, NOW, "t1")
    assert store.append(QUEUE, b"two", None, NOW, "t2")
    assert not store.append(QUEUE, b"gone", NOW - 1, NOW, "t3")  # expired: no token
    assert sent(store, "c") == []
    batch = store.seal()
    assert batch is not None and store.seal() is None  # nothing recorded since
    store.write(batch)
    assert store.completed(batch) == ["t1", "t2"]
    assert sent(store, "c") == [(0, 0, b"one"), (1, 0, b"two")]
    store.settle("c", 0, Settlement.ACCEPTED, NOW, token="ack")
    assert store.flush() == ["ack"]
    store.close()


def test_a_message_finished_before_its_batch_is_sealed_is_never_written(path: Path) -> None:
    store = Store.open(path, lambda address: QueueLimits())  # payloads kept in memory
    store.attach(QUEUE, "c")
    store.append(QUEUE, b"quick", None, NOW, "producer-1")
    store.append(QUEUE, b"slow", None, NOW, "producer-2")
    assert sent(store, "c") == [(0, 0, b"quick"), (1, 0, b"slow")], "in memory: delivered at once"
    assert store.finished_before_written() == []
    store.settle("c", 0, Settlement.ACCEPTED, NOW, token="ack")
    # Its producer may be accepted now: the consumer has it, and nothing of it is left to write.
    assert store.finished_before_written() == ["producer-1"]
    batch = store.seal()
    assert batch is not None and list(batch.inserts) == [1 << 40 | 1] and not batch.deletes
    store.write(batch)
    assert store.completed(batch) == ["producer-2", "ack"]
    rows = sqlite3.connect(path).execute("SELECT payload FROM messages").fetchall()
    assert rows == [(b"slow",)]
    store.close()


def test_a_message_dead_lettered_before_it_was_written_is_accepted_with_its_dead_letter(path: Path) -> None:
    store = Store.open(path, lambda address: QueueLimits(dead_letter=None if address == "dead" else "dead"))
    store.attach(QUEUE, "c")
    store.append(QUEUE, b"bad", None, NOW, "producer")
    assert sent(store, "c") == [(0, 0, b"bad")]
    store.settle("c", 0, Settlement.REJECTED, NOW)
    assert store.finished_before_written() == [], "its only copy is the dead letter, not yet written"
    batch = store.seal()
    assert batch is not None
    store.write(batch)
    assert store.completed(batch) == ["producer"]
    store.close()
    reopened = Store.open(path, limits_for)
    reopened.attach("dead", "d")
    assert [p for _, _, p in sent(reopened, "d")] == [b"bad"]
    reopened.close()


def test_a_restart_brings_back_what_was_durable(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "a1", pool="a")
    store.attach(QUEUE, "b1", pool="b")
    for i in range(5):
        store.append(QUEUE, b"m%d" % i, None, NOW, None)
    store.flush()
    assert [o for o, _, _ in sent(store, "a1", 3)] == [0, 1, 2]
    store.settle("a1", 0, Settlement.ACCEPTED, NOW)  # b still needs it: a mark
    store.settle("a1", 1, Settlement.RELEASED, NOW)
    assert [o for o, _, _ in sent(store, "b1", 1)] == [0]
    store.settle("b1", 0, Settlement.ACCEPTED, NOW)  # finished by both: deleted
    store.append(QUEUE, b"late", None, NOW, None)
    store.flush()
    store.append(QUEUE, b"lost", None, NOW, None)  # never written
    del store  # a crash: no close

    store = Store.open(path, limits_for)
    queue = store.queues[QUEUE]
    assert [m.offset for m in queue.messages()] == [1, 2, 3, 4, 5]
    store.attach(QUEUE, "a2", pool="a")
    store.attach(QUEUE, "b2", pool="b")
    # a: 1 released then raised by the restart, 2 in flight then raised; b's cursor had passed 0 only.
    assert sent(store, "a2") == [(1, 2, b"m1"), (2, 1, b"m2"), (3, 0, b"m3"), (4, 0, b"m4"), (5, 0, b"late")]
    assert [o for o, _, _ in sent(store, "b2")] == [1, 2, 3, 4, 5]
    assert store.append(QUEUE, b"next", None, NOW, None) and queue.next_offset == 7  # offsets never reused
    store.close()


def test_commits_run_on_a_writer_thread_while_the_next_batch_fills(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "c")
    with ThreadPoolExecutor(1) as writer:
        store.append(QUEUE, b"first", None, NOW, 1)
        first = store.seal()
        assert first is not None
        running = writer.submit(store.write, first)
        store.append(QUEUE, b"second", None, NOW, 2)  # recorded while the first batch is written
        running.result()
        assert store.completed(first) == [1]
        assert [p for _, _, p in sent(store, "c")] == [b"first"]
        second = store.seal()
        assert second is not None
        writer.submit(store.write, second).result()
        assert store.completed(second) == [2]
    assert [p for _, _, p in sent(store, "c")] == [b"second"]
    store.close()


def test_dead_letters_move_durably_to_their_queue(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "c")
    store.append(QUEUE, b"poison", None, NOW, None)
    store.append(QUEUE, b"bad", None, NOW, None)
    store.flush()
    sent(store, "c", 2)
    store.settle("c", 1, Settlement.REJECTED, NOW)
    for _ in range(3):  # max_deliveries 3: the third failure moves it
        store.settle("c", 0, Settlement.MODIFIED, NOW)
        sent(store, "c", 1)
    store.flush()
    assert store.queues[QUEUE].depth == 0
    del store

    store = Store.open(path, limits_for)
    assert store.queues[QUEUE].depth == 0
    store.attach("dead", "d")
    assert [p for _, _, p in sent(store, "d")] == [b"bad", b"poison"]
    store.close()


def test_groups_dropped_and_expired_messages_leave_the_file(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "a1", pool="a")
    store.attach(QUEUE, "b1", pool="b")
    store.append(QUEUE, b"short", NOW + 1, NOW, None)
    store.append(QUEUE, b"long", None, NOW, None)
    store.flush()
    assert store.next_deadline() == NOW + 1
    assert store.expire(NOW + 2) == 1
    store.detach("b1", NOW)
    store.drop_group(QUEUE, "b")
    store.close()

    with sqlite3.connect(path) as db:
        assert [p for (p,) in db.execute("SELECT payload FROM messages")] == [b"long"]
        assert [n for (n,) in db.execute("SELECT name FROM groups")] == ["a"]
    store = Store.open(path, limits_for)
    assert list(store.queues[QUEUE].groups) == ["a"]
    store.close()


def test_a_failed_write_is_reported_and_the_file_keeps_the_last_good_batch(path: Path) -> None:
    store = Store.open(path, limits_for)
    store.attach(QUEUE, "c")
    store.append(QUEUE, b"kept", None, NOW, None)
    store.flush()
    pages = store.engine._writer.execute("PRAGMA page_count").fetchone()[0]
    store.engine._writer.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    store.append(QUEUE, b"x" * 100_000, None, NOW, "big")
    batch = store.seal()
    assert batch is not None
    with pytest.raises(EngineFailed, match=r"store\.db: writing a batch failed .*full.*Check the disk"):
        store.write(batch)
    with pytest.raises(EngineFailed, match="failed earlier"):
        store.append(QUEUE, b"more", None, NOW, None)

    store = Store.open(path, limits_for)
    assert [m.size for m in store.queues[QUEUE].messages()] == [4]
    store.close()


def test_producers_get_no_credit_beyond_the_room_or_while_commits_lag(path: Path) -> None:
    store = Store.open(path, lambda address: QueueLimits(max_depth=5))
    assert store.producer_credit(QUEUE, 100) == 5
    store.append(QUEUE, b"x", None, NOW, None)
    assert store.producer_credit(QUEUE, 100) == 4
    store.append(QUEUE, bytes(MAX_UNWRITTEN), None, NOW, None)  # not yet written
    assert store.producer_credit(QUEUE, 100) == 0
    store.flush()
    assert store.producer_credit(QUEUE, 100) == 3
    store.close()


def test_recovery_drops_marks_whose_message_or_group_is_gone(path: Path) -> None:
    Store.open(path, limits_for).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO marks VALUES (12345, 1, 2, 0)")
    Store.open(path, limits_for).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM marks").fetchone() == (0,)


def test_a_commit_waits_only_while_a_consumer_holds_one_of_its_messages(path: Path) -> None:
    store = Store.open(path, lambda address: QueueLimits(), commit_delay=0.002)
    assert store.commit_due(10.0) is None, "nothing to write"
    store.attach(QUEUE, "c")
    store.append(QUEUE, b"waits", None, NOW, "p0")
    assert store.commit_due(10.0) == 0.0, "no consumer holds it: waiting would only delay its producer"
    store.flush()
    assert sent(store, "c") == [(0, 0, b"waits")]
    assert store.commit_due(10.0) is None, "held, but written already"
    store.settle("c", 0, Settlement.ACCEPTED, NOW)
    store.flush()
    store.append(QUEUE, b"one", None, NOW, "p1")
    assert sent(store, "c") == [(1, 0, b"one")]
    assert store.commit_due(10.0) == pytest.approx(0.002)
    assert store.commit_due(10.0015) == pytest.approx(0.0005), "counted from when the batch began"
    store.append(QUEUE, b"two", None, NOW, "p2")
    store.settle("c", 1, Settlement.ACCEPTED, NOW)
    assert store.finished_before_written() == ["p1"]
    assert store.commit_due(10.0016) == 0.0, "what is left is held by nobody"
    store.flush()
    assert sent(store, "c") == [(2, 0, b"two")]
    store.settle("c", 2, Settlement.ACCEPTED, NOW)  # written already: its deletion is recorded
    assert store.commit_due(20.0) == 0.0
    store.flush()
    store.append(QUEUE, b"three", None, NOW, "p3")
    assert sent(store, "c") == [(3, 0, b"three")]
    store.settle("c", 3, Settlement.ACCEPTED, NOW)
    assert store.finished_before_written() == ["p3"]
    assert store.commit_due(30.0) is None, "only the group's cursor moved: nothing worth a commit"
    store.close()
