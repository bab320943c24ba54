"""A meshbus.messaging service that forks after it made its transport.

Run by test_fork.py as `python -m tests.messaging.fork_peer URL`: it serves and calls an RPC server, forks;
the child calls through the transport it inherited (which must say at once that it cannot), then through one
of its own, and tells the parent through a pipe. The parent calls again and prints one JSON object with what
both saw (the test asserts on it).
"""

from __future__ import annotations

import json
import os
import select
import sys
from typing import Any

from meshbus.messaging import MessagingError, RPCClient, RPCServer, Target, Transport

WAIT = 10.0  # seconds for what takes milliseconds


class Echo:
    def echo(self, ctxt: dict[str, Any], text: str) -> dict[str, Any]:
        return {"text": text, "served_by": os.getpid()}


def child(url: str, client: RPCClient, inherited: Transport, report: int) -> None:
    """In the forked child: never returns."""
    seen: dict[str, Any] = {}
    try:
        client.call({}, "echo", text="inherited")
        seen["inherited"] = "answered"
    except MessagingError as error:
        seen["inherited"] = str(error)
    with Transport(url) as own:
        seen["own"] = RPCClient(own, Target(topic="fork-echo"), timeout=WAIT).call({}, "echo", text="own")
    inherited.close()  # nothing: the connection and its thread are the parent's
    os.write(report, json.dumps(seen).encode())
    os._exit(0)


def main(url: str) -> None:
    transport = Transport(url)
    server = RPCServer(transport, Target(topic="fork-echo", server="parent"), [Echo()])
    server.start()
    client = RPCClient(transport, Target(topic="fork-echo"), timeout=WAIT)
    report: dict[str, Any] = {"parent": os.getpid(), "before": client.call({}, "echo", text="before")}
    readable, writable = os.pipe()
    if os.fork() == 0:
        child(url, client, transport, writable)
    os.close(writable)
    if select.select([readable], [], [], 2 * WAIT)[0]:
        report.update(json.loads(os.read(readable, 65536)))
    os.wait()
    report["after"] = client.call({}, "echo", text="after")
    server.stop()
    server.wait()
    transport.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
