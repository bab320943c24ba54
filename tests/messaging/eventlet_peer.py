"""A process that eventlet monkey-patches before importing meshbus, as an oslo service on eventlet does.

Run by test_eventlet.py as `python -m tests.messaging.eventlet_peer URL`: it serves an RPC server and calls it
from many green threads at once on one transport, and prints one JSON object with what it saw (the test
asserts on it).
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402  (after monkey-patching, as a service on eventlet imports)
import sys  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from meshbus.messaging import (  # noqa: E402
    NotificationListener,
    Notifier,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from tests.green_endpoint import CALLERS, WAIT, Endpoint, Ticker, gather_all, wait_until  # noqa: E402


def main(url: str) -> None:
    topic = f"eventlet-{uuid.uuid4().hex[:8]}"
    ticker = Ticker()
    transport = Transport(url)
    endpoint = Endpoint()
    server = RPCServer(transport, Target(topic=topic, server="peer"), [endpoint], max_workers=CALLERS)
    server.start()
    client = RPCClient(transport, Target(topic=topic), timeout=WAIT)
    report: dict[str, Any] = {}

    report["gathered"] = gather_all(lambda number: client.call({}, "gather", number=number))
    report["endpoint_os_threads"] = endpoint.on_main_thread()

    before = ticker.ticks
    report["slow"] = client.call({}, "slow", seconds=0.3)
    report["ticked_during_call"] = ticker.ticks > before

    try:  # a green thread that gives up waiting (eventlet.Timeout): the transport carries on
        with eventlet.Timeout(0.1):
            client.call({}, "slow", seconds=1.0)
        report["abandoned"] = "no timeout"
    except eventlet.Timeout:
        report["abandoned"] = "timeout"
    report["after_abandon"] = client.call({}, "gather", number=21)

    for number in range(5):
        client.cast({}, "note", number=number)
    wait_until(lambda: len(endpoint.casts) >= 5)
    report["casts"] = sorted(endpoint.casts)

    listener = NotificationListener(transport, [Target(topic=topic)], [endpoint])
    listener.start()
    Notifier(transport, "peer", topics=[topic]).info({}, "peer.event", 5)
    wait_until(lambda: endpoint.notified)
    report["notified"] = endpoint.notified[0][1]

    for service in (server, listener):
        service.stop()
        service.wait()
    transport.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
