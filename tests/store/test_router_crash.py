"""kill -9 of the router holding the store, in a loop, with producers and consumers at work: every message
the router accepted is delivered at least once, whatever round it was sent in."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

from meshbus.amqp.client import ClientConnection, Host
from tests.conftest import Router, start_router
from tests.store.crash_clients import ADDRESS, Tally, drain, on_message, produce

ROUNDS = 20
PRODUCERS = 2


async def _round(router: Router, round_: int, tally: Tally, rng: random.Random) -> None:
    """Producers and a consumer at work until the router is killed, some time into the round."""
    consumer = ClientConnection([Host(router.host, router.port)])
    arrived = asyncio.Event()
    consumer.receive(ADDRESS, on_message(tally, arrived), credit=100)
    producers = [asyncio.create_task(produce(router, f"{round_}-{p}", tally)) for p in range(PRODUCERS)]
    await asyncio.sleep(rng.uniform(0.2, 0.6))
    router.kill()
    await asyncio.sleep(0.05)
    for task in producers:
        task.cancel()
    for task in producers:
        with contextlib.suppress(BaseException):
            await task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(consumer.close(), 2.0)


async def _drain(router: Router, tally: Tally) -> None:
    consumer = ClientConnection([Host(router.host, router.port)])
    arrived = asyncio.Event()
    consumer.receive(ADDRESS, on_message(tally, arrived), credit=500)
    await drain(tally, arrived)
    await consumer.close()


def test_every_accepted_message_survives_kill_9_of_the_store_holding_router(tmp_path: Path) -> None:
    rng = random.Random(6)
    tally = Tally()
    router: Router | None = None
    try:
        for round_ in range(ROUNDS):
            router = start_router(tmp_path, "crash", {})
            asyncio.run(_round(router, round_, tally, rng))
        router = start_router(tmp_path, "crash", {})
        assert router.wait_for_log(r"store .* opened \(sync full\): 1 queues", 5.0)
        asyncio.run(_drain(router, tally))
        router.stop()
    finally:
        if router is not None:
            router.kill()
    lost = tally.accepted - tally.received
    accepted = len(tally.accepted)
    assert accepted > ROUNDS * 100, f"too little traffic to mean anything: {accepted} accepted"
    assert not lost, f"{len(lost)} of {accepted} accepted messages were lost, e.g. {sorted(lost)[:5]}"
