"""Client connections to a real router for the client's tests: a consumer and a producer, made and closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from meshbus.amqp.client import ClientConnection, Host, IncomingMessage, Receiver
from tests.conftest import Router

WAIT = 10.0  # seconds to wait for what should happen at once


@contextlib.asynccontextmanager
async def consumer_and_producer(
    router: Router, address: str
) -> AsyncIterator[tuple[ClientConnection, Receiver, ClientConnection]]:
    """A connection with a receiver on `address` that accepts all it gets (attached), and a connection to
    send with: (the consumer's connection, its receiver, the producer's connection)."""
    hosts = [Host(router.host, router.port)]
    server, client = ClientConnection(hosts), ClientConnection(hosts)
    try:
        await asyncio.wait_for(asyncio.gather(server.wait_connected(), client.wait_connected()), WAIT)
        consumer = server.receive(address, IncomingMessage.accept)
        await asyncio.wait_for(consumer.ready(), WAIT)
        yield server, consumer, client
    finally:
        await asyncio.gather(server.close(), client.close())
