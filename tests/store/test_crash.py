"""kill -9 of a process writing and consuming a real store file, in a loop, then checks on what it said.

Each round starts `crash_writer.py` on the same file (it recovers what the previous round left), lets it
append, deliver and acknowledge with group commits on a writer thread for a random while, and kills it with
SIGKILL. Checked from its output, every round and after a final drain in this process:
- nothing reported durable is lost: each group either accepted it or still gets it;
- nothing whose acceptance was reported durable is delivered to that group again;
- each group is handed new (never delivered) messages in append order.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from meshbus.store.queue import QueueLimits, Settlement
from meshbus.store.store import Store

WRITER = Path(__file__).with_name("crash_writer.py")
QUEUE = "notify/crash"
GROUPS = ("a", "b")
ROUNDS = 20
READY_TIMEOUT = 30.0


class Ledger:
    """What the writers said, accumulated over the rounds."""

    def __init__(self) -> None:
        self.durable: set[int] = set()
        self.accepted: dict[str, set[int]] = {g: set() for g in GROUPS}  # tried, durable or not
        self.acknowledged: dict[str, set[int]] = {g: set() for g in GROUPS}  # reported durable
        self.deliveries = 0

    def read_round(self, lines: list[str]) -> None:
        last_new = {g: -1 for g in GROUPS}  # the last never-delivered id handed to the group this round
        for line in lines:
            kind, *fields = line.split()
            if kind == "G":
                group, ident, count = fields[0], int(fields[1]), int(fields[2])
                assert ident not in self.acknowledged[group], f"{group} got {ident} again after its ack"
                if count == 0:
                    assert ident > last_new[group], f"{group} got {ident} after {last_new[group]}"
                    last_new[group] = ident
                self.deliveries += 1
            elif kind == "a":
                self.accepted[fields[0]].add(int(fields[1]))
            elif kind == "A":
                self.acknowledged[fields[0]].add(int(fields[1]))
            elif kind == "D":
                self.durable.add(int(fields[0]))


def run_round(path: Path, round_number: int, rng: random.Random) -> list[str]:
    """One writer, killed after a random while; returns the complete lines it wrote."""
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(round_number), str(rng.randrange(2**32))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert writer.stdout is not None and writer.stderr is not None
    ready = threading.Event()
    chunks: list[bytes] = []

    def collect() -> None:
        assert writer.stdout is not None
        for line in writer.stdout:
            if line == b"ready\n":
                ready.set()
            chunks.append(line)

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        assert ready.wait(READY_TIMEOUT), f"the writer did not start: {writer.stderr.read().decode()}"
        time.sleep(rng.uniform(0.05, 0.4))
        assert writer.poll() is None, f"the writer died by itself: {writer.stderr.read().decode()}"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        reader.join()
        writer.stdout.close()
        writer.stderr.close()
    text = b"".join(chunks).decode()
    return text.split("\n")[:-1]  # the last piece is empty or a line cut by the kill


def drain(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Open the store after the last kill and take everything each group is still owed."""
    store = Store.open(path, lambda address: QueueLimits(max_deliveries=0))
    got: dict[str, list[tuple[int, int]]] = {g: [] for g in GROUPS}
    for group in GROUPS:
        store.attach(QUEUE, group, group)
    while True:
        for group in GROUPS:
            store.flow(group, 1000)
        outs = store.deliveries(time.time())
        if not outs:
            break
        for out in outs:
            got[str(out.consumer)].append((int(out.payload), out.count))
            store.settle(out.consumer, out.offset, Settlement.ACCEPTED, time.time())
    store.close()
    return got


def test_kill_9_in_a_loop_loses_nothing_durable_and_redelivers_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    rng = random.Random(20261126)
    ledger = Ledger()
    for round_number in range(ROUNDS):
        ledger.read_round(run_round(path, round_number, rng))
    assert ledger.deliveries > 0 and all(ledger.acknowledged.values()), "the writers did no work"

    remaining = drain(path)
    for group in GROUPS:
        ids = [ident for ident, _ in remaining[group]]
        assert not set(ids) & ledger.acknowledged[group], f"{group}: acknowledged messages came back"
        new = [ident for ident, count in remaining[group] if count == 0]
        assert new == sorted(new), f"{group}: the rest came out of order"
        lost = ledger.durable - ledger.accepted[group] - set(ids)
        assert not lost, f"{group} lost {len(lost)} durable messages, e.g. {sorted(lost)[:5]}"
