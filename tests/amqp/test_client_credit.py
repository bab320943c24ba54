"""The client connection's sends when the router takes back a sender link's credit, through a real router."""

from __future__ import annotations

import asyncio
import uuid

from proton import Message

from meshbus.amqp.client import ACCEPTED, RELEASED, Outcome
from tests.amqp.connections import WAIT, consumer_and_producer
from tests.conftest import Router


def encoded(address: str) -> bytes:
    return bytes(Message(address=address, body="work").encode())


def test_a_send_written_as_its_links_credit_is_withdrawn_still_gets_an_outcome(
    default_router: Router,
) -> None:
    """A send written on a per-address link just before the client reads the router's withdrawal of that
    link's credit (the address's last consumer left), in the same turn of the loop, is still sent: the
    router releases it, instead of it waiting in the client for credit that never comes."""
    address = f"test-client-credit-{uuid.uuid4().hex[:8]}"

    async def scenario() -> Outcome:
        loop = asyncio.get_running_loop()
        async with consumer_and_producer(default_router, address) as (server, consumer, client):
            first = await asyncio.wait_for(client.send(address, encoded(address)), WAIT)
            assert first.state == ACCEPTED  # the client now has a per-address link with credit
            socket = client._socket
            assert isinstance(socket, asyncio.ReadTransport)
            socket.pause_reading()  # the router's withdrawal of the credit waits, unread, in the socket
            link = consumer.link
            consumer.close()
            deadline = loop.time() + WAIT
            while link in server._links:  # not until the router answered the detach, credit withdrawn
                assert loop.time() < deadline, "the router did not answer the detach"
                await asyncio.sleep(0.01)
            socket.resume_reading()
            # On the next turn the send runs, then the socket is read: both before the send's flush.
            sent: asyncio.Future[asyncio.Future[Outcome]] = loop.create_future()
            loop.call_soon(lambda: sent.set_result(client.send(address, encoded(address))))
            return await asyncio.wait_for(await sent, WAIT)

    loop = asyncio.new_event_loop()  # the selector loop: the order of callbacks above is its order
    try:
        assert loop.run_until_complete(scenario()).state == RELEASED
    finally:
        loop.close()
