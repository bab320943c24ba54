"""An oslo.messaging 14.9.1 peer for interop tests, run by tests/oslo14.py with that release's virtualenv.

It imports neither meshbus nor pytest: it runs under another interpreter. One role per run:

    oslo14_peer.py URL server   --topic T --server S [--exchange E]
    oslo14_peer.py URL client   --topic T [--server S] [--exchange E] [--timeout SEC] [--context JSON] REQ...
    oslo14_peer.py URL notifier --topic T [--publisher P] [--driver messaging(v2)] [--context JSON] NOTE...
    oslo14_peer.py URL listener --topic T

Every line on stdout is a JSON object.
- A server prints {"ready": true} once the router routes to it, then one line per request it takes (server,
  method, args, ctxt). Its methods: echo(value), add(a, b), fail(message) raising ValueError, record(value),
  sleep(seconds) returning the server's name after that long (a caller's call monitor gets heartbeats).
- A client sends each REQ, {"kind": "call"|"cast"|"fanout", "method": M, "args": {...}, "prepare": {...}},
  in turn and prints {"result": ...} or {"error": {"class", "module", "message"}} for it. "prepare"
  (optional) holds RPCClient.prepare() overrides for that request: server, namespace, version, timeout...
- A notifier sends each NOTE, {"priority": P, "event_type": E, "payload": ...}, with a RequestContext made
  from --context, and prints {"sent": P}.
- A listener takes every priority of topic T, prints {"ready": true} once the router routes to it, then one
  line per notification (priority, publisher_id, event_type, payload, ctxt, metadata).
Servers and listeners run until their stdin closes. Their ready probe goes out on their own connection after
their subscriptions, so when it comes back the router has attached those.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from typing import Any

import oslo_messaging as om
from oslo_config import cfg
from oslo_context import context as oslo_context

READY_TIMEOUT = 30.0  # seconds for the ready probe to come back
PROBE_EVENT = "oslo14_peer.ready"
CONF = cfg.CONF  # the global options object: oslo's RPC client finds its metrics options only there

_print_lock = threading.Lock()


def emit(line: dict[str, Any]) -> None:
    with _print_lock:
        print(json.dumps(line), flush=True)


def wait_for_ready(ready: threading.Event) -> None:
    if not ready.wait(READY_TIMEOUT):
        sys.exit(f"oslo14_peer: the ready probe did not come back within {READY_TIMEOUT} s")
    emit({"ready": True})


class Endpoint:
    def __init__(self, server: str, ready: threading.Event) -> None:
        self._server = server
        self._ready = ready

    def _took(self, ctxt: dict[str, Any], method: str, **args: Any) -> None:
        emit({"server": self._server, "method": method, "args": args, "ctxt": ctxt})

    def ready_probe(self, ctxt: dict[str, Any]) -> None:
        self._ready.set()

    def echo(self, ctxt: dict[str, Any], value: Any) -> Any:
        self._took(ctxt, "echo", value=value)
        return value

    def add(self, ctxt: dict[str, Any], a: Any, b: Any) -> Any:
        self._took(ctxt, "add", a=a, b=b)
        return a + b

    def fail(self, ctxt: dict[str, Any], message: str) -> None:
        self._took(ctxt, "fail", message=message)
        raise ValueError(message)

    def record(self, ctxt: dict[str, Any], value: Any) -> None:
        self._took(ctxt, "record", value=value)

    def sleep(self, ctxt: dict[str, Any], seconds: float) -> str:
        self._took(ctxt, "sleep", seconds=seconds)
        time.sleep(seconds)
        return self._server


class Notifications:
    def __init__(self, ready: threading.Event) -> None:
        self._ready = ready

    def _took(
        self,
        priority: str,
        ctxt: dict[str, Any],
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        if event_type == PROBE_EVENT:
            self._ready.set()
            return
        emit(
            {
                "priority": priority,
                "publisher_id": publisher_id,
                "event_type": event_type,
                "payload": payload,
                "ctxt": ctxt,
                "metadata": metadata,
            }
        )

    # The dispatcher subscribes to the priorities its endpoints have a method for.
    audit = functools.partialmethod(_took, "audit")
    debug = functools.partialmethod(_took, "debug")
    info = functools.partialmethod(_took, "info")
    warn = functools.partialmethod(_took, "warn")
    error = functools.partialmethod(_took, "error")
    critical = functools.partialmethod(_took, "critical")
    sample = functools.partialmethod(_took, "sample")


class RequestContextSerializer(om.NoOpSerializer):  # type: ignore[misc]
    """As services do: a Notifier drops a plain dict context and sends a RequestContext's redacted copy."""

    def serialize_context(self, ctxt: Any) -> dict[str, Any]:
        return dict(ctxt.to_dict())


def serve(args: argparse.Namespace) -> None:
    transport = om.get_rpc_transport(CONF, url=args.url)
    target = om.Target(exchange=args.exchange, topic=args.topic, server=args.server)
    ready = threading.Event()
    server = om.get_rpc_server(transport, target, [Endpoint(args.server, ready)], executor="threading")
    server.start()
    om.get_rpc_client(transport, target).cast({}, "ready_probe")
    wait_for_ready(ready)
    sys.stdin.read()
    server.stop()
    server.wait()
    transport.cleanup()


def call(args: argparse.Namespace) -> None:
    transport = om.get_rpc_transport(CONF, url=args.url)
    target = om.Target(exchange=args.exchange, topic=args.topic, server=args.server)
    client = om.get_rpc_client(transport, target, timeout=args.timeout)
    for request in map(json.loads, args.requests):
        kind, method, kwargs = request["kind"], request["method"], request.get("args", {})
        prepared = client.prepare(fanout=kind == "fanout", **request.get("prepare", {}))
        try:
            if kind == "call":
                emit({"result": prepared.call(args.context, method, **kwargs)})
            else:
                prepared.cast(args.context, method, **kwargs)
                emit({"result": None})
        except Exception as error:
            # A remote exception's text is its message followed by the remote traceback.
            message = str(error).split("\n", 1)[0]
            emit(
                {
                    "error": {
                        "class": type(error).__name__,
                        "module": type(error).__module__,
                        "message": message,
                    }
                }
            )
    transport.cleanup()


def notify(args: argparse.Namespace) -> None:
    transport = om.get_notification_transport(CONF, url=args.url)
    notifier = om.Notifier(
        transport,
        publisher_id=args.publisher,
        driver=args.driver,
        topics=[args.topic],
        serializer=RequestContextSerializer(),
    )
    context = oslo_context.RequestContext.from_dict(args.context)
    for note in map(json.loads, args.notes):
        getattr(notifier, note["priority"])(context, note["event_type"], note["payload"])
        emit({"sent": note["priority"]})
    transport.cleanup()


def listen(args: argparse.Namespace) -> None:
    transport = om.get_notification_transport(CONF, url=args.url)
    ready = threading.Event()
    targets = [om.Target(topic=args.topic)]
    listener = om.get_notification_listener(transport, targets, [Notifications(ready)], executor="threading")
    listener.start()
    om.Notifier(transport, driver="messagingv2", topics=[args.topic]).info({}, PROBE_EVENT, None)
    wait_for_ready(ready)
    sys.stdin.read()
    listener.stop()
    listener.wait()
    transport.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="An oslo.messaging 14.9.1 peer for meshbus interop tests.")
    parser.add_argument("url", help="transport URL, amqp://HOST:PORT/")
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("server")
    server.add_argument("--server", required=True)
    client = roles.add_parser("client")
    client.add_argument("--server")
    client.add_argument("--timeout", type=float, default=10.0)
    client.add_argument("requests", nargs="*")
    notifier = roles.add_parser("notifier")
    notifier.add_argument("--publisher", default="oslo14-peer")
    notifier.add_argument("--driver", default="messagingv2", choices=["messaging", "messagingv2"])
    notifier.add_argument("notes", nargs="*")
    listener = roles.add_parser("listener")
    for role in (server, client, notifier, listener):
        role.add_argument("--topic", required=True)
    for role in (server, client):
        role.add_argument("--exchange")
    for role in (client, notifier):
        role.add_argument("--context", type=json.loads, default={})
    args = parser.parse_args()
    # oslo's metrics thread, not a daemon, otherwise holds the process 10 s after its last RPC client request.
    CONF.set_override("metrics_thread_stop_timeout", 0, group="oslo_messaging_metrics")
    {"server": serve, "client": call, "notifier": notify, "listener": listen}[args.role](args)


if __name__ == "__main__":
    main()
