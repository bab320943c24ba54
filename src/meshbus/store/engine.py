"""Durable storage of the queues: one SQLite database in WAL mode, written in group commits.

Rules of this module:
1. It owns the database file: the schema, the records of a batch, the transaction and fsync that make a
   batch durable, reading payloads back, and reading the whole state back at start. It makes no decision
   about messages (queue.py does) and implements the `Journal` that queues report their changes to.
2. Group commit: records accumulate in the open `Batch` on the thread that drives the queues (the event
   loop); `seal()` closes it, and `write(batch)` makes it durable with one transaction and one fsync, on a
   writer thread or synchronously. Batches are written one at a time, in the order they were sealed; while
   one is written the next one fills, so batches grow with the load. Whatever a batch carries (a message,
   an acknowledgement, the tokens given to `when_durable` and `when_stored`) is durable once `write` has
   returned. A batch that holds nothing but cursors is not sealed: they ride with the next one.
   A message deleted before its batch was sealed is never written, and its `when_stored` token is final
   at once (`take_finished_unwritten`).
3. The writer touches only the sealed batch and its own connection. Payloads are read back on another
   connection, which sees the last committed state while a write is under way (WAL).
4. A failed write (disk full, I/O error) leaves the file as after the last good batch: it is rolled back
   whole, and the engine refuses every later batch (`EngineFailed`). Reopening the file recovers.
5. Layout: a message's key is `queue id << 40 | offset` (its row id, so one queue's messages are
   contiguous and in order); marks record, per message and group, a delivery count or that the group has
   finished it (only while other groups still need the message); a group's cursor is saved with each
   batch, only to raise delivery counts at recovery.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshbus.store.queue import Group, GroupRecord, Message, Queue

OFFSET_BITS: Final = 40  # offsets per queue: 2**40
OFFSET_MASK: Final = (1 << OFFSET_BITS) - 1
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY, address TEXT NOT NULL UNIQUE, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY, queue INTEGER NOT NULL, name TEXT NOT NULL, start INTEGER NOT NULL,
    cursor INTEGER NOT NULL, UNIQUE (queue, name));
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, deadline REAL, size INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS marks (
    message INTEGER NOT NULL, grp INTEGER NOT NULL, count INTEGER NOT NULL, finished INTEGER NOT NULL,
    PRIMARY KEY (message, grp)) WITHOUT ROWID;
"""
INSERT_MESSAGE: Final = "INSERT INTO messages (id, deadline, size, payload) VALUES (?, ?, ?, ?)"
DELETE_MESSAGE: Final = "DELETE FROM messages WHERE id = ?"
SCAN_MESSAGES: Final = "SELECT id, deadline, size FROM messages WHERE id >= ? AND id < ? ORDER BY id"
SET_COUNT: Final = (
    "INSERT INTO marks (message, grp, count, finished) VALUES (?, ?, ?, 0) "
    "ON CONFLICT (message, grp) DO UPDATE SET count = excluded.count"
)
SET_FINISHED: Final = (
    "INSERT INTO marks (message, grp, count, finished) VALUES (?, ?, 0, 1) "
    "ON CONFLICT (message, grp) DO UPDATE SET finished = 1"
)


class EngineFailed(Exception):
    """The store's file could not be written; nothing after the last good batch is durable."""


@dataclass(slots=True, eq=False)
class Batch:
    """The records of one group commit."""

    structure: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)  # queues and groups, in order
    inserts: dict[int, tuple[int, float | None, int, bytes]] = field(default_factory=dict)  # by key
    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # (key, group id) -> delivery count
    finished: list[tuple[int, int]] = field(default_factory=list)  # (key, group id)
    deletes: list[tuple[int]] = field(default_factory=list)
    unmarks: list[tuple[int]] = field(default_factory=list)  # keys whose marks go with them
    cursors: dict[int, int] = field(default_factory=dict)  # group id -> cursor
    next_offsets: dict[int, int] = field(default_factory=dict)  # queue id -> next offset
    ends: dict[str, int] = field(default_factory=dict)  # address -> offset below which all is appended
    tokens: list[object] = field(default_factory=list)  # when_durable's
    stored: dict[int, object] = field(default_factory=dict)  # when_stored's, by the key of their insert
    bytes: int = 0  # payload bytes carried

    def __bool__(self) -> bool:
        """Whether it needs writing. Cursors alone do not: they only raise delivery counts at recovery."""
        return any(
            (
                self.structure,
                self.inserts,
                self.counts,
                self.finished,
                self.deletes,
                self.tokens,
            )
        )

    def all_tokens(self) -> list[object]:
        """The tokens this batch makes durable: its messages' producers first."""
        return [*self.stored.values(), *self.tokens]


@dataclass(slots=True)
class QueueState:
    """A queue as read back at start. Iterate `messages` (offset, deadline, size) before the next one."""

    address: str
    next_offset: int
    groups: list[GroupRecord]
    messages: Iterator[tuple[int, float | None, int]]


class Engine:
    """The database of one store: a `Journal` for its queues, written in group commits."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        """`synchronous` FULL fsyncs each commit (durable against power loss); NORMAL leaves that to the
        checkpoints (durable against a killed process only)."""
        self.path = Path(path)
        self._writer = self._connect(synchronous)
        self._writer.executescript(SCHEMA)
        self._reader = self._connect(synchronous)
        self._queue_ids: dict[str, int] = dict(
            self._reader.execute("SELECT address, id FROM queues").fetchall()
        )
        self._addresses = {queue_id: address for address, queue_id in self._queue_ids.items()}
        self._group_ids: dict[tuple[str, str], int] = {}
        for address, name, group_id in self._reader.execute(
            "SELECT q.address, g.name, g.id FROM groups AS g JOIN queues AS q ON q.id = g.queue"
        ):
            self._group_ids[address, name] = group_id
        self._last_queue_id = max(self._queue_ids.values(), default=0)
        self._last_group_id = max(self._group_ids.values(), default=0)
        self._open = Batch()
        self._unwritten = 0  # payload bytes recorded and not yet written
        self._finished_unwritten: list[object] = []  # when_stored tokens of messages deleted before sealing
        self._failure: BaseException | None = None

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit. Used from one thread at a time (see rule 3).
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        return connection

    @property
    def unwritten_bytes(self) -> int:
        """Payload bytes recorded and not yet durable (for producer flow control)."""
        return self._unwritten

    # -- recovery ------------------------------------------------------------------------------------

    def recover(self) -> Iterator[QueueState]:
        """Read back every queue; drops marks left behind by messages or groups that are gone."""
        writer = self._writer
        writer.execute("BEGIN")
        writer.execute("DELETE FROM marks WHERE message NOT IN (SELECT id FROM messages)")
        writer.execute("DELETE FROM marks WHERE grp NOT IN (SELECT id FROM groups)")
        writer.execute("COMMIT")
        marks: dict[int, dict[int, tuple[int, bool]]] = {}
        for key, group_id, count, finished in self._reader.execute("SELECT * FROM marks"):
            marks.setdefault(group_id, {})[key & OFFSET_MASK] = (count, bool(finished))
        groups: dict[int, list[GroupRecord]] = {}
        for group_id, queue_id, name, start, cursor in self._reader.execute(
            "SELECT id, queue, name, start, cursor FROM groups ORDER BY id"
        ):
            record = GroupRecord(name, start, cursor, marks.get(group_id, {}))
            groups.setdefault(queue_id, []).append(record)
        queues = self._reader.execute("SELECT id, address, next_offset FROM queues ORDER BY id").fetchall()
        for queue_id, address, next_offset in queues:
            yield QueueState(address, next_offset, groups.get(queue_id, []), self._scan(queue_id))

    def _scan(self, queue_id: int) -> Iterator[tuple[int, float | None, int]]:
        base = queue_id << OFFSET_BITS
        for key, deadline, size in self._reader.execute(SCAN_MESSAGES, (base, base + (1 << OFFSET_BITS))):
            yield key - base, deadline, size

    def read(self, address: str, offsets: list[int]) -> dict[int, bytes]:
        """The stored payloads of these messages of a queue (those still stored)."""
        if not offsets:
            return {}
        base = self._queue_ids[address] << OFFSET_BITS
        low, high = min(offsets), max(offsets)
        wanted = set(offsets)
        if high - low < 4 * len(wanted):  # close together: one range scan
            rows = self._reader.execute(
                "SELECT id, payload FROM messages WHERE id BETWEEN ? AND ?", (base + low, base + high)
            ).fetchall()
        else:
            select = "SELECT id, payload FROM messages WHERE id = ?"
            rows = [row for offset in wanted for row in self._reader.execute(select, (base + offset,))]
        return {key - base: payload for key, payload in rows if key - base in wanted}

    # -- the journal ---------------------------------------------------------------------------------

    def _queue_id(self, queue: Queue) -> int:
        queue_id = self._queue_ids.get(queue.address)
        if queue_id is None:
            self._last_queue_id = queue_id = self._last_queue_id + 1
            self._queue_ids[queue.address] = queue_id
            self._addresses[queue_id] = queue.address
            self._open.structure.append(
                ("INSERT INTO queues VALUES (?, ?, ?)", (queue_id, queue.address, queue.next_offset))
            )
        return queue_id

    def appended(self, queue: Queue, message: Message, payload: bytes) -> None:
        queue_id = self._queue_id(queue)
        key = queue_id << OFFSET_BITS | message.offset
        batch = self._open
        batch.inserts[key] = (key, message.deadline, message.size, payload)
        batch.next_offsets[queue_id] = batch.ends[queue.address] = message.offset + 1
        batch.bytes += message.size
        self._unwritten += message.size

    def finished(self, queue: Queue, group: Group, offset: int) -> None:
        key = self._queue_ids[queue.address] << OFFSET_BITS | offset
        self._open.finished.append((key, self._group_ids[queue.address, group.name]))

    def failed(self, queue: Queue, group: Group, offset: int, count: int) -> None:
        key = self._queue_ids[queue.address] << OFFSET_BITS | offset
        self._open.counts[key, self._group_ids[queue.address, group.name]] = count

    def deleted(self, queue: Queue, message: Message, marked: bool) -> None:
        key = self._queue_ids[queue.address] << OFFSET_BITS | message.offset
        batch = self._open
        if batch.inserts.pop(key, None) is not None:
            batch.bytes -= message.size  # appended and deleted before any write: never written
            self._unwritten -= message.size
            token = batch.stored.pop(key, None)
            if token is not None:
                self._finished_unwritten.append(token)
            return
        batch.deletes.append((key,))
        if marked:
            batch.unmarks.append((key,))

    def advanced(self, queue: Queue, group: Group) -> None:
        self._open.cursors[self._group_ids[queue.address, group.name]] = group.cursor

    def group_created(self, queue: Queue, group: Group) -> None:
        queue_id = self._queue_id(queue)
        self._last_group_id = group_id = self._last_group_id + 1
        self._group_ids[queue.address, group.name] = group_id
        self._open.structure.append(
            (
                "INSERT INTO groups VALUES (?, ?, ?, ?, ?)",
                (group_id, queue_id, group.name, group.start, group.cursor),
            )
        )

    def group_dropped(self, queue: Queue, group: Group) -> None:
        group_id = self._group_ids.pop((queue.address, group.name))
        self._open.cursors.pop(group_id, None)
        self._open.structure.append(("DELETE FROM groups WHERE id = ?", (group_id,)))
        self._open.structure.append(("DELETE FROM marks WHERE grp = ?", (group_id,)))

    def when_durable(self, token: object) -> None:
        """Report `token` with the batch that makes everything recorded so far durable."""
        self._open.tokens.append(token)

    def when_stored(self, queue: Queue, message: Message, token: object) -> None:
        """Report `token` with the batch that writes this message, just appended; or, if the message is
        deleted before its batch is sealed, from `take_finished_unwritten` (nothing of it is left to
        write)."""
        self._open.stored[self._queue_ids[queue.address] << OFFSET_BITS | message.offset] = token

    def take_finished_unwritten(self) -> list[object]:
        """The `when_stored` tokens of the messages deleted before their batch was sealed, since last
        asked."""
        tokens, self._finished_unwritten = self._finished_unwritten, []
        return tokens

    def unwritten(self) -> Iterator[tuple[str, int]]:
        """The (queue address, offset) of the messages the open batch would write."""
        addresses = self._addresses
        for key in self._open.inserts:
            yield addresses[key >> OFFSET_BITS], key & OFFSET_MASK

    @property
    def has_records(self) -> bool:
        """Whether the open batch needs writing."""
        return bool(self._open)

    # -- group commit --------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise EngineFailed if an earlier write failed (nothing recorded now could become durable)."""
        if self._failure is not None:
            raise EngineFailed(f"store {self.path} failed earlier ({self._failure}); restart to recover it")

    def seal(self) -> Batch | None:
        """Close the open batch and return it for writing; None if nothing was recorded."""
        self.check()
        batch = self._open
        if not batch:
            return None
        self._open = Batch()
        return batch

    def write(self, batch: Batch) -> None:
        """Make a sealed batch durable: one transaction, one fsync. Runs on any one thread at a time."""
        self.check()
        writer = self._writer
        try:
            writer.execute("BEGIN")
            for sql, args in batch.structure:
                writer.execute(sql, args)
            writer.executemany(INSERT_MESSAGE, batch.inserts.values())
            writer.executemany(
                SET_COUNT, [(key, group, count) for (key, group), count in batch.counts.items()]
            )
            writer.executemany(SET_FINISHED, batch.finished)
            writer.executemany(DELETE_MESSAGE, batch.deletes)
            writer.executemany("DELETE FROM marks WHERE message = ?", batch.unmarks)
            writer.executemany("UPDATE groups SET cursor = ? WHERE id = ?", _swapped(batch.cursors))
            writer.executemany("UPDATE queues SET next_offset = ? WHERE id = ?", _swapped(batch.next_offsets))
            writer.execute("COMMIT")
        except sqlite3.Error as error:
            self._failure = error
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise EngineFailed(
                f"store {self.path}: writing a batch failed ({error}); its messages were not stored. Check "
                "the disk (space, permissions), then restart to recover from the last good batch"
            ) from error

    def completed(self, batch: Batch) -> list[object]:
        """On the thread that records: `batch` was written. Returns its tokens."""
        self._unwritten -= batch.bytes
        return batch.all_tokens()

    def close(self) -> None:
        """Close the file (after the last write). The WAL is folded into the database first."""
        if self._failure is None:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._reader.close()
        self._writer.close()


def _swapped(values: dict[int, int]) -> list[tuple[int, int]]:
    return [(value, key) for key, value in values.items()]
