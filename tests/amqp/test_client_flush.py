"""When the client connection writes its output: at the end of the loop's turn, or sooner in a long turn."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from proton import Message

from meshbus.amqp.client import SEND_WITHIN, ClientConnection, Host
from tests.conftest import Router

WAIT = 10.0


class CountingSocket:
    """The connection's socket, counting its writes."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.socket.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.socket, name)


def writes_within_one_turn(router: Router, pause: float, *, send_within: float | None) -> int:
    """Socket writes made while one callback sends twice, `pause` seconds apart (before its turn ends)."""
    address = f"test-client-flush-{uuid.uuid4().hex[:8]}"
    payload = bytes(Message(address=address, body="work").encode())

    async def scenario() -> int:
        connection = ClientConnection([Host(router.host, router.port)])
        try:
            await asyncio.wait_for(connection.wait_connected(), WAIT)
            connection.send_within = send_within
            socket = CountingSocket(connection._socket)
            connection._socket = socket  # type: ignore[assignment]
            counted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def burst() -> None:
                connection.send(None, payload)
                time.sleep(pause)
                connection.send(None, payload)
                counted.set_result(socket.writes)

            asyncio.get_running_loop().call_soon(burst)
            return await asyncio.wait_for(counted, WAIT)
        finally:
            await connection.close()

    return asyncio.run(scenario())


def test_sends_wait_for_the_end_of_a_short_turn(default_router: Router) -> None:
    assert writes_within_one_turn(default_router, 0.0, send_within=60.0) == 0  # however slow this machine is


def test_sends_are_written_within_a_long_turn(default_router: Router) -> None:
    """Tasks sending through one long turn: the router gets the first sends while the turn goes on."""
    assert writes_within_one_turn(default_router, 3 * SEND_WITHIN, send_within=SEND_WITHIN) == 1


def test_without_send_within_sends_wait_for_the_end_of_even_a_long_turn(default_router: Router) -> None:
    assert writes_within_one_turn(default_router, 3 * SEND_WITHIN, send_within=None) == 0
