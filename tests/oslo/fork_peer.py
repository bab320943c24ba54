"""An oslo.messaging service that forks its workers after it made its transport, as oslo.service's
ProcessLauncher does (API workers of neutron-server, say).

Run by test_fork.py as `python -m tests.oslo.fork_peer URL`: it makes a transport, an RPC server on it and
a client, calls the server, then forks. The child calls the server (which runs in the parent) and notifies
through the transports it inherited, cleans them up, and tells the parent what it got through a pipe. The
parent prints one JSON object with what both saw (the test asserts on it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import uuid
import warnings
from typing import Any

import oslo_messaging

from tests.oslo.conf import configuration

WAIT = 10.0  # seconds for what takes milliseconds; the test's subprocess time-out is longer


class Endpoint:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def echo(self, ctxt: dict[str, Any], text: str) -> dict[str, Any]:
        return {"text": text, "served_by": os.getpid()}

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.notified.append(event_type)


def child(client: Any, notifier: Any, transports: list[Any], report: int) -> None:
    """In the forked worker: never returns."""
    try:
        answer = client.call({}, "echo", text="from the child")
        notifier.info({}, "child.event", {})
        for transport in transports:  # as a worker does before it exits: the notification goes out first
            transport.cleanup()
        result = {"child_pid": os.getpid(), "child_answer": answer}
    except BaseException as error:  # reported, not raised: the parent prints the report
        result = {"child_error": repr(error)}
    os.write(report, json.dumps(result).encode())
    os._exit(0)


def main(url: str) -> None:
    topic = f"fork-{uuid.uuid4().hex[:8]}"
    conf = configuration()
    transport = oslo_messaging.get_rpc_transport(conf, url)
    endpoint = Endpoint()
    server = oslo_messaging.get_rpc_server(
        transport, oslo_messaging.Target(topic=topic, server="parent"), [endpoint], executor="threading"
    )
    server.start()
    notifications = oslo_messaging.get_notification_transport(conf, url)
    listener = oslo_messaging.get_notification_listener(
        notifications, [oslo_messaging.Target(topic=topic)], [endpoint], executor="threading"
    )
    listener.start()
    client = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic), timeout=WAIT)
    notifier = oslo_messaging.Notifier(notifications, "parent", driver="messaging", topics=[topic])
    report: dict[str, Any] = {
        "parent_pid": os.getpid(),
        "parent_answer": client.call({}, "echo", text="first"),
    }

    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        if "eventlet" in sys.modules:  # as oslo.service does in each worker: a hub of its own
            from eventlet import hubs

            hubs.use_hub()
        os.close(readable)
        child(client, notifier, [transport, notifications], writable)
    os.close(writable)
    if select.select([readable], [], [], 2 * WAIT)[0]:
        report.update(json.loads(os.read(readable, 65536) or b'{"child_error": "nothing reported"}'))
    else:
        report["child_error"] = f"no report within {2 * WAIT} s: the child hangs"
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for _ in range(int(WAIT / 0.1)):  # the child's notification, sent in the background
        if "child.event" in endpoint.notified or "child_error" in report:
            break
        select.select([], [], [], 0.1)
    report["notified"] = endpoint.notified
    for service in (server, listener):
        service.stop()
        service.wait()
    for opened in (transport, notifications):
        opened.cleanup()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    main(sys.argv[1])
