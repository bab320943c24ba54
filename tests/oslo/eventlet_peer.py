"""An oslo.messaging 18 service on eventlet, as most OpenStack services still run: monkey-patched before
anything else is imported, so oslo picks its `eventlet` executor, with `transport_url = meshbus://...`.

Run by test_eventlet.py as `python -m tests.oslo.eventlet_peer URL`: an RPC server, green threads calling
it all at once through one transport, a call that lives on heartbeats, casts, a fanout cast, notifications
to a listener pool and to a batch listener (a partial batch after its time-out), then the server stopped
while a call is in progress. It prints one JSON object with what it saw (the test asserts on it).
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import faulthandler  # noqa: E402  (after monkey-patching, as a service on eventlet imports)
import json  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import oslo_messaging  # noqa: E402

from tests.green_endpoint import WAIT, Endpoint, Ticker, gather_all, wait_until  # noqa: E402
from tests.oslo.conf import configuration  # noqa: E402


class Batches:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def info(self, messages: list[dict[str, Any]]) -> None:
        self.batches.append([message["payload"] for message in messages])


def main(url: str) -> None:
    topic = f"oslo-eventlet-{uuid.uuid4().hex[:8]}"
    ticker = Ticker()
    conf = configuration()
    transport = oslo_messaging.get_rpc_transport(conf, url)
    endpoint = Endpoint()
    target = oslo_messaging.Target(topic=topic, server="peer")
    server = oslo_messaging.get_rpc_server(transport, target, [endpoint])  # executor: oslo picks eventlet
    report: dict[str, Any] = {"executor": server.executor_type}
    server.start()
    client = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic), timeout=WAIT)

    report["gathered"] = gather_all(lambda number: client.call({}, "gather", number=number))
    report["endpoint_os_threads"] = endpoint.on_main_thread()

    before = ticker.ticks
    report["slow"] = client.call({}, "slow", seconds=0.3)
    report["ticked_during_call"] = ticker.ticks > before
    # Longer than the monitor's time-out: only the server's heartbeats (a green thread's) keep it alive.
    report["monitored"] = client.prepare(call_monitor_timeout=2).call({}, "slow", seconds=3.0)

    for number in range(5):
        client.cast({}, "note", number=number)
    client.prepare(fanout=True).cast({}, "note", number=5)
    wait_until(lambda: len(endpoint.casts) >= 6)
    report["casts"] = sorted(endpoint.casts)

    notify_transport = oslo_messaging.get_notification_transport(conf, url)
    listener = oslo_messaging.get_notification_listener(
        notify_transport, [oslo_messaging.Target(topic=topic)], [endpoint], pool="pool"
    )
    listener.start()
    notifier = oslo_messaging.Notifier(notify_transport, "peer", driver="messaging", topics=[topic])
    for number in range(3):
        notifier.info({}, "peer.event", number)
    wait_until(lambda: len(endpoint.notified) >= 3)
    report["notified"] = sorted(endpoint.notified)

    batches = Batches()
    batch_listener = oslo_messaging.get_batch_notification_listener(
        notify_transport,
        [oslo_messaging.Target(topic=f"{topic}-batch")],
        [batches],
        batch_size=5,
        batch_timeout=0.2,
    )
    batch_listener.start()
    batch_notifier = oslo_messaging.Notifier(
        notify_transport, "peer", driver="messaging", topics=[f"{topic}-batch"]
    )
    for number in range(2):
        batch_notifier.info({}, "peer.batch", number)
    wait_until(lambda: batches.batches)
    report["batches"] = batches.batches

    # Stopped while a call is in progress: wait() lets it finish, and its caller gets the answer.
    slow = eventlet.spawn(client.call, {}, "slow", seconds=0.3)
    wait_until(lambda: endpoint.slow_started == 3)
    server.stop()
    server.wait()
    report["answered_while_stopping"] = slow.wait()

    for stopping in (listener, batch_listener):
        stopping.stop()
        stopping.wait()
    notify_transport.cleanup()
    transport.cleanup()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # eventlet's and oslo's deprecation warnings
    faulthandler.dump_traceback_later(3 * WAIT, exit=True)  # a hang: the stacks on stderr, and out
    main(sys.argv[1])
