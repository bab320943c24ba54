"""Clients for the kill -9 tests of the store: producers that count what a router accepted, and a consumer's
handler that counts what arrived, so a test can tell whether every accepted message was delivered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter

from proton import Message

from meshbus.amqp.client import ACCEPTED, ClientConnection, Handler, Host, IncomingMessage, Outcome
from tests.conftest import Router

ADDRESS = "openstack.org/om/notify/anycast/crash/test.info"  # a queue address by the default rules
IN_FLIGHT = 50  # unsettled sends per producer
PAUSE = 0.05  # seconds a producer waits after a send that was not accepted, rather than spin
DRAIN_TIMEOUT = 30.0  # seconds for a consumer to receive every accepted message once the store is back


class Tally:
    """What the clients saw: sends per producer label (message `{label}-{n}` has n < sent[label]), bodies
    accepted by a router, bodies received; `deliveries - len(received)` were duplicates."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.accepted: set[str] = set()
        self.received: set[str] = set()
        self.deliveries = 0

    def record(self, message: IncomingMessage) -> None:
        """A consumer got `message`."""
        decoded = Message()
        decoded.decode(message.payload)
        self.received.add(str(decoded.body))
        self.deliveries += 1


def on_message(tally: Tally, arrived: asyncio.Event) -> Handler:
    """A consumer's handler: record the message, accept it, set `arrived`."""

    def handle(message: IncomingMessage) -> None:
        tally.record(message)
        message.accept()
        arrived.set()

    return handle


async def produce(router: Router, label: str, tally: Tally) -> None:
    """Send durable messages `{label}-0`, `{label}-1`... to ADDRESS through `router`, IN_FLIGHT unsettled at a
    time, until cancelled; those whose outcome is ACCEPTED join `tally.accepted`."""
    connection = ClientConnection([Host(router.host, router.port)])
    try:
        await connection.wait_connected(5.0)
        window = asyncio.Semaphore(IN_FLIGHT)
        refused = asyncio.Event()  # the last outcome was not ACCEPTED: nobody stores the queue right now
        for n in itertools.count():
            await window.acquire()
            if refused.is_set():
                refused.clear()
                await asyncio.sleep(PAUSE)
            body = f"{label}-{n}"
            tally.sent[label] += 1
            sent = connection.send(ADDRESS, Message(body=body, durable=True).encode())

            def done(future: asyncio.Future[Outcome], body: str = body) -> None:
                window.release()
                if future.cancelled() or future.exception() is not None:
                    refused.set()  # the router died first: the outcome is unknown
                elif future.result().state == ACCEPTED:
                    tally.accepted.add(body)
                else:
                    refused.set()

            sent.add_done_callback(done)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 2.0)


async def drain(tally: Tally, arrived: asyncio.Event) -> None:
    """Wait until every accepted message was received (`arrived` is set on each arrival), or DRAIN_TIMEOUT
    passed: the caller then counts what was lost."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT
    while not tally.accepted <= tally.received and loop.time() < deadline:
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), deadline - loop.time())
