"""kill -9 of the router holding the store, in a loop, with producers and consumers at work: every message
the router accepted is delivered at least once, whatever round it was sent in."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from pathlib import Path

from proton import Message

from meshbus.amqp.client import ACCEPTED, ClientConnection, Handler, Host, IncomingMessage, Outcome
from tests.conftest import Router, start_router

ROUNDS = 20
ADDRESS = "openstack.org/om/notify/anycast/crash/test.info"
IN_FLIGHT = 50  # unsettled sends per producer
PRODUCERS = 2
DRAIN_TIMEOUT = 30.0  # seconds for the last round's consumer to receive every accepted message
QUIET = 1.0  # seconds without a message after which the last consumer stops waiting for more


class Tally:
    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.received: set[str] = set()


def _on_message(tally: Tally, arrived: asyncio.Event) -> Handler:
    def handle(message: IncomingMessage) -> None:
        decoded = Message()
        decoded.decode(message.payload)
        tally.received.add(str(decoded.body))
        message.accept()
        arrived.set()

    return handle


async def _produce(router: Router, round_: int, producer: int, tally: Tally) -> None:
    connection = ClientConnection([Host(router.host, router.port)])
    try:
        await connection.wait_connected(5.0)
        window = asyncio.Semaphore(IN_FLIGHT)
        for n in itertools.count():
            await window.acquire()
            body = f"{round_}-{producer}-{n}"
            sent = connection.send(ADDRESS, Message(body=body, durable=True).encode())

            def done(future: asyncio.Future[Outcome], body: str = body) -> None:
                window.release()
                if future.cancelled() or future.exception() is not None:
                    return  # the router died first: the outcome is unknown
                if future.result().state == ACCEPTED:
                    tally.accepted.add(body)

            sent.add_done_callback(done)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 2.0)


async def _round(router: Router, round_: int, tally: Tally, rng: random.Random) -> None:
    """Producers and a consumer at work until the router is killed, some time into the round."""
    consumer = ClientConnection([Host(router.host, router.port)])
    arrived = asyncio.Event()
    consumer.receive(ADDRESS, _on_message(tally, arrived), credit=100)
    producers = [asyncio.create_task(_produce(router, round_, p, tally)) for p in range(PRODUCERS)]
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
    consumer.receive(ADDRESS, _on_message(tally, arrived), credit=500)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT
    while not tally.accepted <= tally.received and loop.time() < deadline:
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), QUIET)
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
        assert router.wait_for_log(r"store .* opened: 1 queues", 5.0)
        asyncio.run(_drain(router, tally))
        router.stop()
    finally:
        if router is not None:
            router.kill()
    lost = tally.accepted - tally.received
    accepted = len(tally.accepted)
    assert accepted > ROUNDS * 100, f"too little traffic to mean anything: {accepted} accepted"
    assert not lost, f"{len(lost)} of {accepted} accepted messages were lost, e.g. {sorted(lost)[:5]}"
