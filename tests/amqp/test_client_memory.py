"""What a connection leaves allocated once closed, at either end: nothing, however many come and go."""

from __future__ import annotations

import asyncio
import ctypes
import gc
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from meshbus.amqp.client import ClientConnection, Host
from meshbus.amqp.connection import AmqpConnection
from meshbus.amqp.engine import Engine
from meshbus.config import ListenerConfig, RouterConfig
from tests.conftest import Router

WAIT = 10.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
    ]


def allocated() -> int:
    """Bytes malloc has handed out and not had back (glibc): where proton's objects live."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    gc.collect()
    return int(libc.mallinfo2().uordblks)


async def open_and_close(host: Host, times: int) -> None:
    for _ in range(times):
        connection = ClientConnection([host])
        await asyncio.wait_for(connection.wait_connected(), WAIT)
        await connection.close()


def test_a_client_keeps_nothing_of_its_connections_once_closed(default_router: Router) -> None:
    host = Host(default_router.host, default_router.port)

    async def scenario() -> int:
        await open_and_close(host, 20)  # what the first connections allocate for good (caches, the loop's)
        before = allocated()
        await open_and_close(host, 200)
        return allocated() - before

    # Each connection's proton objects (its connection, session and relay link) take a few KiB: had they
    # stayed, 200 would hold hundreds.
    assert asyncio.run(scenario()) < 64 * 1024


def test_a_router_keeps_nothing_of_the_connections_that_came_and_went() -> None:
    # The router's engine in this process, so that its allocations are counted with the client's.
    config = RouterConfig()
    listener = ListenerConfig(host="127.0.0.1", port=0)

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as executor:
            engine = Engine(
                "memory-test", config.distribution_rules(), None, executor, 0.0, config.queue_rules()
            )
            server = await asyncio.get_running_loop().create_server(
                lambda: cast(asyncio.Protocol, AmqpConnection(engine, listener)), "127.0.0.1", 0
            )
            port = server.sockets[0].getsockname()[1]
            try:
                await open_and_close(Host("127.0.0.1", port), 20)
                before = allocated()
                await open_and_close(Host("127.0.0.1", port), 200)
                return allocated() - before
            finally:
                server.close()

    assert asyncio.run(scenario()) < 64 * 1024
