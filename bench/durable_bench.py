"""Durable messaging benchmark: a router with its embedded store against RabbitMQ, in the same run.

Owns: one line per figure (`name value unit`, then RabbitMQ's figure of the same run and the ratio):
1. Durable throughput: a producer sends N messages to a queue address and waits for each outcome, which
   the router gives once the message is fsync'd in its store, while a consumer receives and accepts them
   all (meshbus: the C load clients of router_bench.py on a notification address, a stored queue). The
   peer: RabbitMQ (Debian's rabbitmq-server, a private node started by bench/rabbit.py) with a durable queue,
   persistent messages and publisher confirms, pika clients (a publisher with confirms pipelined over a
   window, a consumer acknowledging each message). Figures: accepted msgs/s (first send to last
   acceptance/confirm) and delivered msgs/s (first send to the last message consumed).
2. Recovery: a store file holding M messages (default 1,000,000; filled in-process through the store's
   own API, then served by a router that is killed with SIGKILL), the router restarted on it: seconds from
   the restart until a consumer holds the first message, and the store's own recovery time from its log.
3. Disk bytes per stored message (database and WAL).
Must not: install anything, listen beyond 127.0.0.1, or signal a process it did not start.

Run: .venv/bin/python bench/durable_bench.py [--quick] [--messages N] [--stored M] [--only meshbus|rabbit]
(pika comes with the project's `bench` extra: pip install -e '.[test,bench]').
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rabbit
from meshbus.store.queue import QueueLimits
from meshbus.store.store import Store
from router_bench import (
    LISTENING,
    LOCALHOST,
    ROUTER,
    ROUTER_CPUS,
    BenchError,
    Figure,
    build_client,
    report,
    running,
    stop_on_sigterm,
)
from store_bench import disk_bytes

ADDRESS = "openstack.org/om/notify/anycast/bench/durable.info"  # a queue by the built-in rule
RABBIT_QUEUE = "bench-durable"
STORED_LOG = re.compile(
    r"store (\S+) opened \(sync \w+\): (\d+) queues, (\d+) messages recovered in ([\d.]+) s"
)
FILL_BATCH = 10_000  # messages per commit while filling the store for the recovery figure
RABBIT_WINDOW = 1000  # unconfirmed messages the publisher keeps in flight
CREDIT = 1000  # the consumers' credit (meshbus) and prefetch (RabbitMQ)
GOAL_RATIO = 2.0
GOAL_RECOVERY = 5.0  # seconds for 1,000,000 stored messages


def timeout(count: int) -> float:
    return 60.0 + count / 2000


# -- meshbus ----------------------------------------------------------------------------------------------


def router_config(directory: Path, store: Path) -> Path:
    config = directory / "router.toml"
    config.write_text(f'[router]\nid = "bench"\n\n[store]\npath = "{store}"\n')
    return config


def meshbus_throughput(
    router_command: Path, directory: Path, count: int, body_size: int
) -> tuple[float, float, float]:
    """(accepted msgs/s, delivered msgs/s, disk bytes per message after the producer's run)."""
    client = str(build_client())
    store = directory / "through.db"
    argv = [str(router_command), "router", "--config", str(router_config(directory, store))]
    with running("router", [*argv, "--listen", f"{LOCALHOST}:0"], cpus=ROUTER_CPUS) as router:
        host_port = router.expect(LISTENING.pattern, 30, on_stderr=True)[1]
        common = ["-a", host_port, "-t", ADDRESS, "-n", str(count), "-T", str(int(timeout(count)))]
        with running("receiver", [client, "recv", *common, "-c", str(CREDIT)]) as receiver:
            receiver.expect("^ready", 10)
            with running("sender", [client, "send", *common, "-s", str(body_size)]) as sender:
                sent = sender.result(timeout(count) + 10)
                received = receiver.result(timeout(count) + 10)
        if router.stop() != 0:
            print(f"warning: router pid {router.pid} did not exit 0 on SIGTERM", file=sys.stderr)
    if sent["accepted"] != count or received["count"] != count:
        raise BenchError(
            f"meshbus: {sent['accepted']:.0f} accepted, {received['count']:.0f} received of {count}"
        )
    return sent["rate"], count / (received["end"] - sent["start"]), disk_bytes(store) / count


def fill(path: Path, count: int, body_size: int) -> None:
    """A store file holding `count` messages of the queue, written as the router would (group commits)."""
    store = Store.open(path, lambda address: QueueLimits(max_depth=max(count, 1)))
    payload = _encoded(body_size)
    now = time.time()
    for n in range(count):
        store.append(ADDRESS, payload, None, now, None)
        if n % FILL_BATCH == FILL_BATCH - 1:
            store.flush()
    store.close()


def _encoded(body_size: int) -> bytes:
    from proton import Message

    return bytes(Message(body=b"x" * body_size, durable=True).encode())


def meshbus_recovery(
    router_command: Path, directory: Path, count: int, body_size: int
) -> tuple[float, float, float]:
    """(seconds from restart to the first message consumed, the store's recovery seconds, disk bytes per
    message), the store holding `count` messages and its router killed with SIGKILL before the restart."""
    client = str(build_client())
    store = directory / "recovery.db"
    fill(store, count, body_size)
    size = disk_bytes(store) / count
    argv = [str(router_command), "router", "--config", str(router_config(directory, store))]
    argv += ["--listen", f"{LOCALHOST}:0"]
    limit = QueueLimits().max_depth
    if count > limit:
        raise BenchError(f"--stored {count} exceeds the queue's default max_depth {limit}")
    with running("router", argv, cpus=ROUTER_CPUS) as router:
        router.expect(LISTENING.pattern, 120, on_stderr=True)
        router.popen.kill()  # SIGKILL: no orderly close, the WAL as the crash left it
        router.popen.wait()
    started = time.monotonic()
    with running("router", argv, cpus=ROUTER_CPUS) as router:
        opened = router.expect(STORED_LOG.pattern, 120, on_stderr=True)  # logged before listening
        host_port = router.expect(LISTENING.pattern, 10, on_stderr=True)[1]
        common = ["-a", host_port, "-t", ADDRESS, "-n", "1", "-c", "1", "-T", "60"]
        with running("receiver", [client, "recv", *common]) as receiver:
            first = receiver.result(70)["end"]
        router.stop()
    if int(opened[3]) != count:
        raise BenchError(f"the restarted router did not report {count} messages recovered")
    return first - started, float(opened[4]), size


# -- RabbitMQ ---------------------------------------------------------------------------------------------


class RabbitPublisher:
    """Child role: publishes persistent messages with confirms, RABBIT_WINDOW unconfirmed at most."""

    def __init__(self, url: str, count: int, body_size: int) -> None:
        import pika

        self.count = count
        self.body = b"x" * body_size
        self.properties = pika.BasicProperties(delivery_mode=2)  # persistent
        self.sent = self.confirmed = 0
        self.start = self.end = 0.0
        self.channel: Any = None
        self.connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_close_callback=lambda c, error: c.ioloop.stop(),
        )

    def run(self) -> None:
        self.connection.ioloop.start()
        elapsed = self.end - self.start
        print(
            f"result count={self.confirmed} start={self.start:.6f} end={self.end:.6f} "
            f"rate={self.count / elapsed:.1f}",
            flush=True,
        )

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(self._on_confirm)
        channel.queue_declare(RABBIT_QUEUE, durable=True, callback=self._on_declared)

    def _on_declared(self, _: Any) -> None:
        print("ready", flush=True)
        self.start = time.monotonic()
        self._publish()

    def _publish(self) -> None:
        while self.sent < self.count and self.sent - self.confirmed < RABBIT_WINDOW:
            self.channel.basic_publish("", RABBIT_QUEUE, self.body, self.properties)
            self.sent += 1

    def _on_confirm(self, frame: Any) -> None:
        from pika.spec import Basic

        method = frame.method
        if isinstance(method, Basic.Nack):
            raise SystemExit(f"RabbitMQ refused message {method.delivery_tag}")
        self.confirmed = method.delivery_tag if method.multiple else self.confirmed + 1
        if self.confirmed >= self.count:
            self.end = time.monotonic()
            self.connection.close()
        else:
            self._publish()


def rabbit_consume(url: str, count: int) -> None:
    """Child role: consume `count` messages, acknowledging each."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(RABBIT_QUEUE, durable=True)
    channel.basic_qos(prefetch_count=CREDIT)
    received = 0
    end = 0.0

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        nonlocal received, end
        channel.basic_ack(method.delivery_tag)
        received += 1
        if received == count:
            end = time.monotonic()
            channel.stop_consuming()

    channel.basic_consume(RABBIT_QUEUE, on_message)
    print("ready", flush=True)
    channel.start_consuming()
    connection.close()
    print(f"result count={received} end={end:.6f}", flush=True)


def rabbit_throughput(count: int, body_size: int) -> tuple[float, float]:
    """(confirmed msgs/s, delivered msgs/s) through a private RabbitMQ node."""
    me = [sys.executable, str(Path(__file__).resolve())]
    with rabbit.rabbitmq("durable-bench", cpus=ROUTER_CPUS) as node:
        url = f"amqp://guest:guest@{node.host}:{node.port}/"
        with running("rabbit consumer", [*me, "rabbit-consume", url, str(count)]) as consumer:
            consumer.expect("^ready", 30)
            publisher_argv = [*me, "rabbit-publish", url, str(count), str(body_size)]
            with running("rabbit publisher", publisher_argv) as publisher:
                sent = publisher.result(timeout(count) + 10)
                received = consumer.result(timeout(count) + 10)
    if sent["count"] < count or received["count"] != count:
        raise BenchError(
            f"rabbit: {sent['count']:.0f} confirmed, {received['count']:.0f} received of {count}"
        )
    return sent["rate"], count / (received["end"] - sent["start"])


# -- the run ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == "rabbit-publish":
        RabbitPublisher(arguments[1], int(arguments[2]), int(arguments[3])).run()
        return 0
    if arguments and arguments[0] == "rabbit-consume":
        rabbit_consume(arguments[1], int(arguments[2]))
        return 0
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="sent and consumed per system")
    parser.add_argument("--stored", type=int, default=1_000_000, help="in the store for the recovery figure")
    parser.add_argument("--body-size", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 messages, 100,000 stored")
    parser.add_argument("--only", choices=["meshbus", "rabbit"])
    parser.add_argument("--router", type=Path, default=ROUTER, help="the meshbus command to run routers with")
    args = parser.parse_args(arguments)
    if args.quick:
        args.messages, args.stored = 20_000, 100_000
    try:
        peer = None if args.only == "meshbus" else rabbit_throughput(args.messages, args.body_size)
        if args.only == "rabbit":
            assert peer is not None
            report(Figure("rabbit_durable_accepted", peer[0], "msg/s"))
            report(Figure("rabbit_durable_delivered", peer[1], "msg/s"))
            return 0
        with tempfile.TemporaryDirectory(prefix="meshbus-durable-bench-") as scratch:
            directory = Path(scratch)
            accepted, delivered, per_message = meshbus_throughput(
                args.router, directory, args.messages, args.body_size
            )
            name = "rabbit" if peer else None
            report(Figure("durable_accepted", accepted, "msg/s", name, peer[0] if peer else None))
            report(Figure("durable_delivered", delivered, "msg/s", name, peer[1] if peer else None))
            report(Figure("store_disk_bytes_per_msg_consumed_queue", per_message, "B"))
            first, recovered, size = meshbus_recovery(args.router, directory, args.stored, args.body_size)
            report(Figure(f"recovery_first_consumable_{args.stored}", first, "s"))
            report(Figure(f"recovery_store_open_{args.stored}", recovered, "s"))
            report(Figure("store_disk_bytes_per_stored_msg", size, "B"))
        if peer:
            ratio = delivered / peer[1]
            verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
            print(f"goal durable_delivered >= {GOAL_RATIO:g}x rabbit: {ratio:.2f}x, {verdict}")
        if args.stored == 1_000_000:
            verdict = "met" if first <= GOAL_RECOVERY else "NOT met"
            print(f"goal recovery of 1,000,000 <= {GOAL_RECOVERY:g} s: {first:.2f} s, {verdict}")
    except (BenchError, rabbit.RabbitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
