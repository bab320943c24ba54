"""The most any oslo.messaging driver could reach on this machine: oslo.messaging 18's own CPU per call, cast
and notification, its client's and its server's, measured with a driver that does no work; beside the rabbit
driver and the meshbus plugin, measured in the same run.

Why it bounds every driver: messaging_bench.py runs the client and the server on the same CPU (the broker or
router on the other), so N operations a second need the client's and the server's CPU per operation to add
up to at most 1/N seconds. What oslo.messaging spends there itself (its RPC client, its server's polling
thread and threading executor, dispatch, serialization) is spent whatever the driver, so 1 / (oslo's client
CPU + oslo's server CPU) is a ceiling no driver's figure in messaging_bench can pass.

Owns: the null driver (its client side answers at once, with nothing sent; its server side hands oslo a
request, or notification, copied from one the client side made, with `CREDIT` unanswered at most, as a
driver with link credit does), one process per measurement placed as messaging_bench places clients and
servers, and the rabbit driver's and the plugin's figures through messaging_bench. One line per figure.
Must not: install anything, listen beyond 127.0.0.1, or signal a process it did not start.

Run: .venv/bin/python bench/oslo_ceiling.py [--seconds 4] [--no-peers]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import messaging_bench
from messaging_bench import (
    GOAL_CONCURRENCY,
    GOAL_RATIO,
    NOTIFY_TOPIC,
    PAYLOAD,
    RABBIT,
    SERVER,
    SYSTEMS,
    TOPIC,
    Control,
    Counts,
    Endpoint,
    NotificationEndpoint,
    in_child,
)
from router_bench import BenchError, Figure, report, stop_on_sigterm

KINDS = ("calls", "casts", "notifications")
CREDIT = 64  # requests (notifications) a server's listener holds unanswered: the plugin's default prefetch
PLUGIN = next(system for system in SYSTEMS if system.key == "oslo_meshbus")


class _Credit:
    """How many made-up messages the server side may still hand out, and how many oslo has finished."""

    def __init__(self) -> None:
        self._free = threading.Semaphore(CREDIT)
        self._lock = threading.Lock()
        self.finished = 0

    def take(self, timeout: float) -> bool:
        return self._free.acquire(timeout=timeout)

    def give_back(self) -> None:
        with self._lock:
            self.finished += 1
        self._free.release()


def _driver_class() -> type:
    """The null driver, made once oslo.messaging is imported (only in the measuring processes)."""
    from oslo_messaging._drivers import base

    class Request(base.RpcIncomingMessage):  # type: ignore[misc]  # oslo is untyped
        """An RPC request; answering it (oslo answers casts too) gives its credit back."""

        def __init__(self, ctxt: dict[str, Any], message: dict[str, Any], credit: _Credit) -> None:
            super().__init__(ctxt, message, None)
            self.credit = credit

        def acknowledge(self) -> None:
            pass

        def requeue(self) -> None:
            self.credit.give_back()

        def heartbeat(self) -> None:
            pass

        def reply(self, reply: Any = None, failure: Any = None) -> None:
            self.credit.give_back()

    class Notification(base.IncomingMessage):  # type: ignore[misc]
        """A notification; acknowledging or requeueing it gives its credit back."""

        def __init__(self, ctxt: dict[str, Any], message: dict[str, Any], credit: _Credit) -> None:
            super().__init__(ctxt, message)
            self.credit = credit

        def acknowledge(self) -> None:
            self.credit.give_back()

        def requeue(self) -> None:
            self.credit.give_back()

    class Listener(base.PollStyleListener):  # type: ignore[misc]
        """Hands out copies of `sent` while there is credit."""

        def __init__(self, make: type, sent: tuple[dict[str, Any], dict[str, Any]], credit: _Credit) -> None:
            super().__init__()
            self.make, self.sent, self.credit = make, sent, credit
            self.stopped = False

        def poll(
            self, timeout: float | None = None, batch_size: int = 1, batch_timeout: float | None = None
        ) -> list[Any]:
            if self.stopped or not self.credit.take(0.1 if timeout is None else timeout):
                return []
            ctxt, message = self.sent
            return [self.make(dict(ctxt), dict(message), self.credit)]

        def stop(self) -> None:
            self.stopped = True

        def cleanup(self) -> None:
            pass

    class NullDriver(base.BaseDriver):  # type: ignore[misc]
        """Sends nothing and answers every call with PAYLOAD (what the benchmark's echo returns); remembers
        the last request (notification) oslo gave it, which its listeners hand out."""

        def __init__(self, conf: Any, url: Any) -> None:
            super().__init__(conf, url)
            self.sent: tuple[dict[str, Any], dict[str, Any]] | None = None
            self.credit = _Credit()

        def send(
            self,
            target: Any,
            ctxt: dict[str, Any],
            message: dict[str, Any],
            wait_for_reply: bool | None = None,
            timeout: float | None = None,
            call_monitor_timeout: float | None = None,
            retry: int | None = None,
            transport_options: Any = None,
        ) -> Any:
            self.sent = (ctxt, message)
            return PAYLOAD if wait_for_reply else None

        def send_notification(
            self, target: Any, ctxt: dict[str, Any], message: dict[str, Any], version: float, retry: Any
        ) -> None:
            self.sent = (ctxt, message)

        def listen(self, target: Any, batch_size: int, batch_timeout: float | None) -> Any:
            return self._listener(Request, batch_size, batch_timeout)

        def listen_for_notifications(
            self, targets_and_priorities: Any, pool: Any, batch_size: int, batch_timeout: float | None
        ) -> Any:
            return self._listener(Notification, batch_size, batch_timeout)

        def _listener(self, make: type, batch_size: int, batch_timeout: float | None) -> Any:
            if self.sent is None:
                raise BenchError("the null driver's listener needs a message sent first, to copy")
            listener = Listener(make, self.sent, self.credit)
            return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

        def cleanup(self) -> None:
            pass

    return NullDriver


class _NullStack(messaging_bench._BlockingStack):
    """oslo.messaging's client, notifier, RPC server and notification listener (threading executor, as
    messaging_bench's OsloStack) on one null driver."""

    def __init__(self) -> None:
        import oslo_messaging
        from oslo_messaging import transport

        conf = messaging_bench.oslo_configuration()
        self.om = oslo_messaging
        self.driver = _driver_class()(conf, oslo_messaging.TransportURL.parse(conf, "null://"))
        self.rpc = transport.RPCTransport(self.driver)
        self.notifications = transport.NotificationTransport(self.driver)
        self.client = oslo_messaging.get_rpc_client(self.rpc, oslo_messaging.Target(topic=TOPIC))
        self.notifier = oslo_messaging.Notifier(
            self.notifications, "bench", driver="messaging", topics=[NOTIFY_TOPIC]
        )

    def server(self, kind: str) -> Any:
        """The server (listener) that takes `kind`, made after one was sent, to copy."""
        om, counts = self.om, Counts()
        self.run(kind, 1, 0.01)
        if kind == "notifications":
            targets, endpoints = [om.Target(topic=NOTIFY_TOPIC)], [NotificationEndpoint(counts)]
            return om.get_notification_listener(self.notifications, targets, endpoints, executor="threading")
        target = om.Target(topic=TOPIC, server=SERVER)
        return om.get_rpc_server(self.rpc, target, [Endpoint(counts)], executor="threading")


def client_cpu(control: Control, kind: str, seconds: float) -> float:
    """oslo's client CPU per `kind`, in microseconds, at GOAL_CONCURRENCY threads."""
    stack = _NullStack()
    stack.run(kind, GOAL_CONCURRENCY, 1.0)
    before = time.process_time()
    run = stack.run(kind, GOAL_CONCURRENCY, seconds)
    return (time.process_time() - before) / run.count * 1e6


def server_cpu(control: Control, kind: str, seconds: float) -> float:
    """oslo's server CPU per `kind` taken, in microseconds, with as many waiting as credit allows."""
    stack = _NullStack()
    server = stack.server(kind)
    server.start()
    try:
        time.sleep(1.0)  # the executor's threads are made, the code paths warm
        credit: _Credit = stack.driver.credit
        finished, before = credit.finished, time.process_time()
        time.sleep(seconds)
        cpu, count = time.process_time() - before, credit.finished - finished
    finally:
        server.stop()
        server.wait()
    if not count:
        raise BenchError(f"the null driver's {kind} server finished nothing in {seconds} s")
    return cpu / count * 1e6


def peer_figures(seconds: float) -> dict[str, float]:
    """The rabbit driver's and the plugin's load figures at GOAL_CONCURRENCY threads (messaging_bench's)."""
    settings = messaging_bench.Settings(
        seconds=seconds, warmup=1.0, idle_servers=0, nobody_timeout=0.0, only=None, kinds=KINDS, repeat=1
    )
    figures = messaging_bench.Figures()
    for system in (RABBIT, PLUGIN):
        at_goal = dataclasses.replace(system, concurrency=(GOAL_CONCURRENCY,))
        messaging_bench.measure(at_goal, settings, figures)
    return figures.values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per figure")
    parser.add_argument(
        "--no-peers", action="store_true", help="oslo's own figures only: no RabbitMQ, no router"
    )
    args = parser.parse_args(argv)
    stop_on_sigterm()
    try:
        peers = {} if args.no_peers else peer_figures(args.seconds)
        print("# oslo.messaging 18 on the null driver, client and server each in a process of its own")
        for kind in KINDS:
            timeout = args.seconds + 120
            client = in_child("null client", timeout, client_cpu, kind, args.seconds)
            server = in_child("null server", timeout, server_cpu, kind, args.seconds)
            name = f"oslo_ceiling_{kind}_{GOAL_CONCURRENCY}_threads"
            report(Figure(f"{name}_client_cpu_per_op", client, "us"))
            report(Figure(f"{name}_server_cpu_per_op", server, "us"))
            ceiling = 1e6 / (client + server)
            rabbit = peers.get(RABBIT.name(kind, GOAL_CONCURRENCY))
            report(Figure(name, ceiling, f"{kind}/s", "rabbit" if rabbit else None, rabbit))
            plugin = peers.get(PLUGIN.name(kind, GOAL_CONCURRENCY))
            if rabbit and plugin:
                print(
                    f"# {kind}: no driver can pass {ceiling / rabbit:.1f}x rabbit here (goal "
                    f"{GOAL_RATIO:g}x); the meshbus plugin reached {plugin / rabbit:.1f}x, "
                    f"{100 * plugin / ceiling:.0f}% of that ceiling",
                    flush=True,
                )
    except BenchError as error:
        print(f"oslo_ceiling: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
