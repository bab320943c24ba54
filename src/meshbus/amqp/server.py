"""The router process: listeners, the timer, signals, start and orderly shutdown.

Rules of this module:
1. It wires config -> Engine (and the embedded store, storehost.py, and the brokers, broker.py) -> asyncio
   servers; the protocol lives in engine.py and connection.py.
2. SIGTERM and SIGINT close every connection with a Close frame, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from meshbus.amqp.broker import BrokerHost
from meshbus.amqp.connection import AmqpConnection
from meshbus.amqp.engine import Engine
from meshbus.amqp.interrouter import Connector, MeshEdge
from meshbus.amqp.storehost import StoreHost
from meshbus.config import ListenerConfig, RouterConfig
from meshbus.router.core import QueueHost, QueueHosts
from meshbus.users import UserDatabase

log = logging.getLogger("meshbus.router")

TICK_INTERVAL = 0.1  # seconds between heartbeat/expiry checks
SHUTDOWN_GRACE = 2.0  # seconds to let Close frames reach peers


def run(config: RouterConfig) -> int:
    """Run a router until SIGTERM or SIGINT; return the exit code."""
    _raise_file_limit()
    try:
        import uvloop
    except ImportError:  # uvloop is optional: the standard loop works, slower
        return asyncio.run(serve(config))
    return int(uvloop.run(serve(config)))


async def serve(config: RouterConfig) -> int:
    loop = asyncio.get_running_loop()
    users = UserDatabase.load(config.router.users_file) if config.router.users_file else None
    if users is None:
        for listener in config.listener:
            if listener.authenticate_peer or listener.sasl_mechanisms == ["PLAIN"]:
                raise SystemExit(
                    f"meshbus: error: listener {listener.host}:{listener.port} requires PLAIN authentication "
                    "but no users file is configured; set users_file in the [router] table "
                    "(create it with `meshbus users add FILE USER`)"
                )
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="meshbus-auth") as executor:
        engine = Engine(
            config.router.id,
            config.distribution_rules(),
            users,
            executor,
            config.router.busy_poll / 1e6,
            config.queue_rules(),
        )
        engine.mesh = MeshEdge(engine, config.router.id, config.mesh.protocol())
        store = StoreHost.open(config, engine.core) if config.store.enabled else None
        if store is not None:
            engine.before_flush.append(store.run_pending_turn)
        brokers = BrokerHost(engine, config)
        brokers.start()
        # The brokers serve the rules naming them; the store every other rule.
        hosts: list[QueueHost] = [brokers] if store is None else [brokers, store.endpoint]
        engine.core.queue_host = QueueHosts(config.queue_rules(), hosts)
        servers = [await _listen(loop, engine, listener) for listener in config.listener]
        connectors = [Connector(engine, c) for c in config.connector if c.role == "inter-router"]
        for connector in connectors:
            connector.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        ticker = asyncio.create_task(_tick(engine))
        log.info("router %s started", config.router.id)
        await stop.wait()
        log.info("router %s stopping: closing %d connections", config.router.id, len(engine.connections))
        ticker.cancel()
        for connector in connectors:
            connector.stop()
        brokers.stop()
        engine.mesh.close()
        for server in servers:
            server.close()
        engine.close_all()
        await _wait_closed(engine)
        if store is not None:
            await store.close()
        log.info("router %s stopped: %s", config.router.id, engine.core.counters)
    return 0


async def _listen(
    loop: asyncio.AbstractEventLoop, engine: Engine, listener: ListenerConfig
) -> asyncio.Server:
    try:
        server = await loop.create_server(
            lambda: cast(asyncio.Protocol, AmqpConnection(engine, listener)),
            listener.host,
            listener.port,
            backlog=4096,
            reuse_address=True,
        )
    except OSError as error:
        raise SystemExit(
            f"meshbus: error: cannot listen on {listener.host}:{listener.port}: {error.strerror}; "
            "choose another port in the [[listener]] table or with --listen"
        ) from error
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        log.info(
            "listening on %s:%d (role %s, sasl %s)",
            host,
            port,
            listener.role,
            ",".join(engine.mechanisms(listener)),
        )
    return server


async def _tick(engine: Engine) -> None:
    while True:
        await asyncio.sleep(TICK_INTERVAL)
        try:
            engine.tick()
        except Exception:
            log.exception("internal error in the router's timer")


async def _wait_closed(engine: Engine) -> None:
    deadline = asyncio.get_running_loop().time() + SHUTDOWN_GRACE
    while engine.connections and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    for conn in list(engine.connections):
        if conn.socket is not None:
            conn.socket.abort()


def _raise_file_limit() -> None:
    """Thousands of connections need thousands of descriptors: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
