"""An in-memory `Journal` for the queue tests: it keeps what the engine would persist, checks the
`marked` flag queues pass on deletion, and rebuilds a queue from what it kept (a restart without a file).

Like the engine, it keeps a group's cursor only when told to save (the engine: with each batch), so a
restart may see a cursor older than the marks."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshbus.store.queue import Group, GroupRecord, Message, Queue, QueueLimits


@dataclass
class Stored:
    start: int
    cursor: int
    marks: dict[int, list[int]] = field(default_factory=dict)  # offset -> [count, finished]


class MemoryJournal:
    def __init__(self) -> None:
        self.next_offset = 0
        self.messages: dict[int, tuple[float | None, int, bytes]] = {}
        self.groups: dict[str, Stored] = {}
        self.calls: list[tuple[object, ...]] = []
        self.unsaved_cursors: dict[str, int] = {}

    def appended(self, queue: Queue, message: Message, payload: bytes) -> None:
        self.messages[message.offset] = (message.deadline, message.size, payload)
        self.next_offset = message.offset + 1
        self.calls.append(("appended", message.offset))

    def finished(self, queue: Queue, group: Group, offset: int) -> None:
        self.groups[group.name].marks.setdefault(offset, [0, 0])[1] = 1
        self.calls.append(("finished", group.name, offset))

    def failed(self, queue: Queue, group: Group, offset: int, count: int) -> None:
        self.groups[group.name].marks.setdefault(offset, [0, 0])[0] = count
        self.calls.append(("failed", group.name, offset, count))

    def deleted(self, queue: Queue, message: Message, marked: bool) -> None:
        del self.messages[message.offset]
        holders = [name for name, stored in self.groups.items() if message.offset in stored.marks]
        assert marked or not holders, f"offset {message.offset} deleted unmarked but {holders} hold marks"
        for stored in self.groups.values():
            stored.marks.pop(message.offset, None)
        self.calls.append(("deleted", message.offset))

    def advanced(self, queue: Queue, group: Group) -> None:
        self.unsaved_cursors[group.name] = group.cursor

    def save_cursors(self) -> None:
        for name, cursor in self.unsaved_cursors.items():
            if name in self.groups:
                self.groups[name].cursor = cursor
        self.unsaved_cursors.clear()

    def group_created(self, queue: Queue, group: Group) -> None:
        self.groups[group.name] = Stored(group.start, group.cursor)
        self.calls.append(("group_created", group.name, group.start))

    def group_dropped(self, queue: Queue, group: Group) -> None:
        del self.groups[group.name]
        self.unsaved_cursors.pop(group.name, None)
        self.calls.append(("group_dropped", group.name))

    def restore(self, address: str, limits: QueueLimits) -> Queue:
        """The queue as a restart would rebuild it from what was journaled (unsaved cursors are lost)."""
        self.unsaved_cursors.clear()
        records = [
            GroupRecord(name, g.start, g.cursor, {o: (c, bool(f)) for o, (c, f) in g.marks.items()})
            for name, g in self.groups.items()
        ]
        messages = [(offset, deadline, size) for offset, (deadline, size, _) in sorted(self.messages.items())]
        return Queue.restore(address, limits, self, self.next_offset, messages, records)
