"""A store writer for the crash test: appends and consumes on a real store file until it is killed.

Usage: crash_writer.py PATH ROUND SEED. Commits run on a writer thread (group commit, as in the router).
It prints one line per event, flushed at once, so whatever the parent reads was said before the kill:
  ready                    the store is open (recovered)
  G <group> <id> <count>   handed to a consumer of the group, with its delivery count
  a <group> <id>           a consumer of the group accepted it (not yet durable)
  D <id>                   the append of message <id> is durable
  A <group> <id>           that acceptance is durable
Message ids are ROUND * 10**7 + n, so ids grow with the append order across rounds.
"""

from __future__ import annotations

import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

from meshbus.store.engine import Batch
from meshbus.store.queue import QueueLimits, Settlement
from meshbus.store.store import Outgoing, Store

QUEUE = "notify/crash"
CONSUMERS = {"a1": "a", "a2": "a", "b1": "b"}  # consumer -> pool
WINDOW = 20  # each consumer's credit
BACKLOG = 2_000  # produce only while the queue holds fewer messages


def limits(address: str) -> QueueLimits:
    return QueueLimits(max_deliveries=0, cache_bytes=4_000)  # small cache: deliveries read the file too


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    path, round_number, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    store = Store.open(path, limits)
    for consumer, pool in CONSUMERS.items():
        store.attach(QUEUE, consumer, pool)
        store.flow(consumer, WINDOW)
    say("ready")
    held: dict[str, list[Outgoing]] = {consumer: [] for consumer in CONSUMERS}
    writing: tuple[Batch, Future[None]] | None = None
    next_id = round_number * 10**7
    with ThreadPoolExecutor(1) as writer:
        while True:
            now = time.time()
            if store.queues[QUEUE].depth < BACKLOG:
                for _ in range(rng.randint(1, 30)):
                    store.append(QUEUE, b"%d" % next_id, None, now, f"D {next_id}")
                    next_id += 1
            for out in store.deliveries(now):
                say(f"G {CONSUMERS[str(out.consumer)]} {int(out.payload)} {out.count}")
                held[str(out.consumer)].append(out)
            for consumer, outs in held.items():
                rng.shuffle(outs)
                for out in outs[: rng.randint(0, len(outs))]:
                    group = CONSUMERS[consumer]
                    if rng.random() < 0.8:
                        say(f"a {group} {int(out.payload)}")
                        token = f"A {group} {int(out.payload)}"
                        store.settle(consumer, out.offset, Settlement.ACCEPTED, now, token)
                    else:
                        store.settle(consumer, out.offset, Settlement.RELEASED, now)
                    outs.remove(out)
                store.flow(consumer, WINDOW - len(outs))
            if writing is not None and writing[1].done():
                writing[1].result()
                for done in store.completed(writing[0]):
                    say(str(done))
                writing = None
            if writing is None and (batch := store.seal()) is not None:
                writing = batch, writer.submit(store.write, batch)
            time.sleep(0.0005)


if __name__ == "__main__":
    main()
