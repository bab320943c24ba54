"""Store benchmark: the durable store's throughput and recovery, and the storage library it is built on.

Prints one line per figure: `name value unit`, then the same-run peer figure and the ratio where one runs
here. Two parts:
1. The store as the router will drive it (meshbus.store: queue logic + SQLite engine, commits on a writer
   thread, one fsync per batch): appends until durable; appends, deliveries and durable acceptances
   together; recovery of the stored messages after a crash (the process state dropped, the file not
   closed) and the time until the first one is handed out; draining them; disk bytes per message.
2. The storage libraries on the same records (key -> deadline, size, payload; one transaction and one
   fsync per batch): SQLite in WAL mode (the engine's own statements) against LMDB (if installed), for
   appends, deletes by key (acknowledgements), a full metadata scan (recovery) and one-message commits.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sqlite3
import struct
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshbus.store.engine import DELETE_MESSAGE, INSERT_MESSAGE, SCHEMA, Batch
from meshbus.store.queue import QueueLimits, Settlement
from meshbus.store.store import Store

QUEUE = "openstack.org/om/notify/anycast/bench/notifications.info"
Row = tuple[int, float | None, int, bytes]  # a stored message: key, deadline, size, payload
NOW = 1_700_000_000.0


def figure(
    name: str, value: float, unit: str, peer: tuple[str, float] | None = None, extra: str = ""
) -> None:
    digits = 0 if value >= 100 else 2
    line = f"{name} {value:.{digits}f} {unit}"
    if peer is not None:
        line += f" {peer[0]} {peer[1]:.{digits}f} {unit} ratio {value / peer[1]:.2f}"
    print(line + (f" ({extra})" if extra else ""), flush=True)


class Committer:
    """Group commit as the router's edge runs it: seal on the loop, write on one writer thread (or, with
    `synchronous`, inline: the loop waits for each fsync)."""

    def __init__(self, store: Store, synchronous: bool = False) -> None:
        self.store = store
        self.synchronous = synchronous
        self.pool = ThreadPoolExecutor(1)
        self.running: tuple[Batch, Future[None]] | None = None
        self.batches = 0
        self.done = 0  # tokens made durable

    def turn(self) -> None:
        """What a turn of the event loop does: collect a finished write, start the next one."""
        if self.running is not None and self.running[1].done():
            self.running[1].result()
            self.done += len(self.store.completed(self.running[0]))
            self.running = None
        if self.running is None and (batch := self.store.seal()) is not None:
            self.batches += 1
            if self.synchronous:
                self.store.write(batch)
                self.done += len(self.store.completed(batch))
            else:
                self.running = batch, self.pool.submit(self.store.write, batch)

    def wait(self) -> None:
        """Nothing else to do: sleep until the write under way is done (an idle loop's select)."""
        if self.running is not None:
            self.running[1].result()
        self.turn()

    def finish(self) -> None:
        while self.running is not None:
            self.wait()

    def close(self) -> None:
        self.finish()
        self.pool.shutdown()


def limits(address: str) -> QueueLimits:
    return QueueLimits(max_depth=10_000_000, max_bytes=1 << 40)


def bench_append(path: Path, count: int, payload: bytes, window: int) -> None:
    """Appends into one queue, no consumer: producers hold `window` credit, given back as their messages
    become durable. The file is kept, uncleanly, for the recovery figures."""
    store = Store.open(path, limits)
    committer = Committer(store)
    appended = 0
    cpu, start = time.process_time(), time.perf_counter()
    while committer.done < count:
        credit = min(window - (appended - committer.done), count - appended)
        for _ in range(credit):
            store.append(QUEUE, payload, None, NOW, None)
        appended += max(credit, 0)
        committer.turn()
        if credit <= 0:
            committer.wait()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = (
        f"{committer.batches} commits, {count / committer.batches:.0f} msgs each, producers' window {window}"
    )
    figure("store_append_durable", count / elapsed, "msg/s", extra=extra)
    figure("store_append_cpu_per_msg", cpu / count * 1e6, "us")
    committer.pool.shutdown()
    # A crash: the store is dropped without closing (the WAL stays as it is).


def bench_recovery(path: Path, count: int) -> None:
    start = time.perf_counter()
    store = Store.open(path, limits)
    opened = time.perf_counter() - start
    store.attach(QUEUE, "c")
    store.flow("c", 1)
    first = store.deliveries(NOW)
    consumable = time.perf_counter() - start
    assert len(first) == 1 and store.queues[QUEUE].depth == count
    figure(f"store_recovery_{count}", opened, "s")
    figure(f"store_first_consumable_{count}", consumable, "s")
    committer = Committer(store)
    start = time.perf_counter()
    drained = 0
    outs = first
    while outs:
        for out in outs:
            store.settle("c", out.offset, Settlement.ACCEPTED, NOW, None)
        drained += len(outs)
        committer.turn()
        store.flow("c", 1000)
        outs = store.deliveries(NOW)
    committer.finish()
    figure("store_drain_after_restart", drained / (time.perf_counter() - start), "msg/s")
    committer.close()
    store.close()


def through(
    path: Path, count: int, payload: bytes, synchronous: bool, window: int = 1000
) -> tuple[float, str]:
    """A producer and a consumer, each with a credit window: appended, durable (only then does the producer
    get its credit back), delivered, accepted, acceptance durable. Returns msgs/s and a note."""
    store = Store.open(path, limits)
    store.attach(QUEUE, "c")
    committer = Committer(store, synchronous)
    appended = acked = 0
    cpu, start = time.process_time(), time.perf_counter()
    while acked < count:
        credit = min(window - (appended - committer.done), count - appended)
        for _ in range(credit):
            store.append(QUEUE, payload, None, NOW, None)
        appended += max(credit, 0)
        store.flow("c", window)
        outs = store.deliveries(NOW)
        for out in outs:
            store.settle("c", out.offset, Settlement.ACCEPTED, NOW)
        acked += len(outs)
        committer.turn()
        if credit <= 0 and not outs:
            committer.wait()
    committer.close()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    store.close()
    return count / elapsed, f"{committer.batches} commits, {cpu / count * 1e6:.1f} us CPU per msg"


def bench_through(path: Path, count: int, payload: bytes, window: int) -> None:
    rate, note = through(path, count, payload, False, window)
    remove(path)
    peer, peer_note = through(path, count, payload, True, window)
    figure(
        "store_append_deliver_ack", rate, "msg/s", ("synchronous", peer), f"{note}; synchronous: {peer_note}"
    )


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


# -- the storage libraries on the same records ----------------------------------------------------------


class SqliteRaw:
    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.db = sqlite3.connect(directory / "raw.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.executescript(SCHEMA)

    def append(self, rows: list[Row]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(INSERT_MESSAGE, rows)
        self.db.execute("COMMIT")

    def delete(self, keys: list[int]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(DELETE_MESSAGE, [(key,) for key in keys])
        self.db.execute("COMMIT")

    def scan(self) -> int:
        return sum(1 for _ in self.db.execute("SELECT id, deadline, size FROM messages ORDER BY id"))

    def reopen(self, directory: Path) -> None:
        self.db.close()
        self.db = sqlite3.connect(directory / "raw.db", isolation_level=None)

    def close(self) -> None:
        self.db.close()


class LmdbRaw:
    """The same records in LMDB: value = deadline (NaN: none), size, payload; big-endian keys."""

    name = "lmdb"
    meta = struct.Struct(">dI")

    def __init__(self, directory: Path, lmdb: Any) -> None:
        self.lmdb = lmdb
        self.env = lmdb.open(str(directory / "raw.lmdb"), map_size=1 << 36, sync=True, metasync=True)

    def append(self, rows: list[Row]) -> None:
        pack = self.meta.pack
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(
                [
                    (key.to_bytes(8, "big"), pack(float("nan") if d is None else d, size) + payload)
                    for key, d, size, payload in rows
                ],
                append=True,
            )

    def delete(self, keys: list[int]) -> None:
        with self.env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key.to_bytes(8, "big"))

    def scan(self) -> int:
        unpack = self.meta.unpack_from
        count = 0
        with self.env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                int.from_bytes(key, "big"), unpack(value)
                count += 1
        return count

    def reopen(self, directory: Path) -> None:
        self.env.close()
        self.env = self.lmdb.open(str(directory / "raw.lmdb"), map_size=1 << 36)

    def close(self) -> None:
        self.env.close()


def measure(
    store: SqliteRaw | LmdbRaw, place: Path, count: int, batch: int, payload: bytes
) -> dict[str, float]:
    """Appends in batches, a full scan after reopening, deletes in batches, one-message commits."""
    rows: list[Row] = [(i, None, len(payload), payload) for i in range(count)]
    got = {}
    start = time.perf_counter()
    for i in range(0, count, batch):
        store.append(rows[i : i + batch])
    got["append"] = count / (time.perf_counter() - start)
    store.reopen(place)
    start = time.perf_counter()
    assert store.scan() == count
    got["scan"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, count, batch):
        store.delete(list(range(i, min(i + batch, count))))
    got["delete"] = count / (time.perf_counter() - start)
    singles = 2000
    start = time.perf_counter()
    for i in range(singles):
        store.append([(count + i, None, 1, b"x")])
    got["commit"] = (time.perf_counter() - start) / singles
    store.close()
    return got


def bench_raw(directory: Path, count: int, batch: int, payload: bytes) -> None:
    try:
        lmdb: Any = importlib.import_module("lmdb")
    except ImportError:
        lmdb = None
        print("lmdb not installed (.venv/bin/pip install lmdb): its figures are skipped", flush=True)
    place = Path(tempfile.mkdtemp(dir=directory))
    sqlite_figures = measure(SqliteRaw(place), place, count, batch, payload)
    lmdb_figures = None if lmdb is None else measure(LmdbRaw(place, lmdb), place, count, batch, payload)
    shutil.rmtree(place)

    def line(name: str, key: str, unit: str, scale: float = 1.0) -> None:
        peer = None if lmdb_figures is None else ("lmdb", lmdb_figures[key] * scale)
        figure(f"{name}_sqlite", sqlite_figures[key] * scale, unit, peer)

    line(f"raw_append_batch_{batch}", "append", "msg/s")
    line(f"raw_delete_batch_{batch}", "delete", "msg/s")
    line(f"raw_scan_{count}", "scan", "s")
    line("raw_commit_one_message", "commit", "us", 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="stored, recovered and drained")
    parser.add_argument("--through", type=int, default=200_000, help="for append+deliver+ack together")
    parser.add_argument("--body-size", type=int, default=100)
    parser.add_argument("--window", type=int, default=1000, help="producers' (and the consumer's) credit")
    parser.add_argument("--batch", type=int, default=1000, help="messages per commit in the raw figures")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 messages")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.through = 20_000, 20_000
    payload = b"x" * args.body_size
    directory = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        path = directory / "store.db"
        bench_append(path, args.messages, payload, args.window)
        figure("store_disk_bytes_per_msg", disk_bytes(path) / args.messages, "B", extra="WAL included")
        bench_recovery(path, args.messages)
        remove(path)
        bench_through(path, args.through, payload, args.window)
        bench_raw(directory, args.messages, args.batch, payload)
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
