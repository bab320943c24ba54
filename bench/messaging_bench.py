"""Messaging benchmark: meshbus.messaging and oslo.messaging over meshbus against oslo.messaging's rabbit
driver on RabbitMQ, in the same run on the same machine.

Owns: starting each system's broker (a `meshbus router`, or a private rabbitmq-server with its own node
name, ports and data directory), an RPC server with a notification listener and the load clients in
processes of their own (as services run), one workload per figure, and one line per figure:
`name value unit`, then the rabbit driver's figure of the same run and the ratio; at the end, the goal
check of issue 4.
Must not: install anything, listen beyond 127.0.0.1, or signal a process it did not start (it stops its
own by PID).

Systems:
  rabbit        oslo.messaging's rabbit driver on RabbitMQ (Debian's rabbitmq-server): the peer
  rabbit_durable  the same with durable queues (amqp_durable_queues = true), notifications only: meshbus
                stores notifications durably (fsync'd before they are acknowledged, unless the listener
                accepted them first), the rabbit driver by default does not, so this is the like-for-like
                figure beside the goal's
  blocking      meshbus.messaging's blocking API: Transport, RPCClient, RPCServer, Notifier, listeners
  asyncio       its asyncio API: AsyncRPCClient, AsyncRPCServer... (coroutine endpoints) on uvloop
  oslo_meshbus  oslo.messaging with the meshbus plugin (transport_url meshbus://...)

Run: .venv/bin/python bench/messaging_bench.py [--quick] [--only meshbus|rabbit] [--repeat N]
     [--kinds calls,casts,notifications]  (with --kinds: those load figures only)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import rabbit
from meshbus import messaging
from router_bench import (
    CLIENT_CPUS,
    ROUTER,
    ROUTER_CPUS,
    BenchError,
    Figure,
    report,
    router,
    rss_kib,
    stop_on_sigterm,
)

PLUGIN_MODULE = "meshbus.oslo.driver"
TOPIC = "bench"
SERVER = "bench-server"
NOTIFY_TOPIC = "bench_notifications"
NOBODY_TOPIC = "bench_nobody"
IDLE_TOPIC = "bench_idle"
PAYLOAD = "x" * 100  # each request's argument; replies carry it back
DRAIN_TIMEOUT = 120.0  # seconds the server may take to consume what the client sent
GOAL_RATIO = 10.0
GOAL_P99_MS = 5.0
GOAL_CONCURRENCY = 16


# -- systems ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class System:
    key: str
    title: str
    broker: str  # "meshbus" (a router) or "rabbit"
    concurrency: tuple[int, ...]  # client threads (tasks for the asyncio API) per call/cast/notify run
    unit: str  # what `concurrency` counts
    kinds: tuple[str, ...] = ("calls", "casts", "notifications")
    peer: bool = False  # a rabbit driver's: the others' figures are compared with it

    def name(self, kind: str, concurrency: int) -> str:
        return f"{self.key}_{kind}_{concurrency}_{self.unit}"


RABBIT = System(
    "rabbit", "oslo.messaging 18 rabbit driver, RabbitMQ", "rabbit", (1, 16), "threads", peer=True
)
RABBIT_DURABLE = System(
    "rabbit_durable",
    "oslo.messaging 18 rabbit driver, RabbitMQ, durable queues",
    "rabbit",
    (16,),
    "threads",
    ("notifications",),
    peer=True,
)
SYSTEMS = (
    RABBIT,
    RABBIT_DURABLE,
    System("blocking", "meshbus.messaging blocking API", "meshbus", (1, 16), "threads"),
    System("asyncio", "meshbus.messaging asyncio API (uvloop)", "meshbus", (1, 16, 100), "tasks"),
    System("oslo_meshbus", "oslo.messaging 18 with the meshbus plugin", "meshbus", (1, 16), "threads"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    seconds: float  # each measured run
    warmup: float  # unmeasured run before each measured one (connections, links, reply queues)
    idle_servers: int
    nobody_timeout: float  # the call time-out while calling a topic nobody serves
    only: str | None  # "meshbus" or "rabbit"
    kinds: tuple[str, ...] | None  # load figures of these kinds only (no call to nobody, no memory)
    repeat: int  # runs of each load figure, its median reported: this VM's figures move by a quarter

    def systems(self) -> list[System]:
        if self.only is None:
            return list(SYSTEMS)
        return [system for system in SYSTEMS if system.broker == self.only]


# -- child processes ----------------------------------------------------------------------------------------


class Control:
    """A child's end of its pipe to the harness."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def ready(self) -> None:
        self.connection.send(("ready", None))

    def wait_stop(self) -> None:
        with contextlib.suppress(EOFError):  # the harness is gone: stop too
            self.connection.recv()


def _child_main(
    connection: Connection, cpus: set[int], function: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.sched_setaffinity(0, cpus)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")  # eventlet's and oslo's deprecation warnings, once per process
    try:
        connection.send(("result", function(Control(connection), *args)))
    except BaseException:
        connection.send(("error", traceback.format_exc()))


class Worker:
    """A process of this benchmark running `function(control, *args)`; stopped by its own PID."""

    def __init__(self, name: str, function: Callable[..., Any], *args: Any) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_end, CLIENT_CPUS, function, args), name=name, daemon=True
        )
        self.process.start()
        child_end.close()

    def receive(self, what: str, timeout: float) -> Any:
        if not self.connection.poll(timeout):
            raise BenchError(f"{self.name} (pid {self.process.pid}): no {what} within {timeout:.0f} s")
        try:
            kind, value = self.connection.recv()
        except EOFError:
            self.process.join(5)
            raise BenchError(
                f"{self.name} (pid {self.process.pid}) exited ({self.process.exitcode}) before its {what}"
            ) from None
        if kind == "error":
            raise BenchError(f"{self.name} (pid {self.process.pid}) failed:\n{value}")
        return value

    def stop(self, grace: float = 30.0) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(("stop", None))
        self.process.join(grace)
        if self.process.is_alive():
            print(f"warning: {self.name} (pid {self.process.pid}) did not stop; terminated", file=sys.stderr)
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def in_child(name: str, timeout: float, function: Callable[..., Any], *args: Any) -> Any:
    """`function(control, *args)`'s result, run in a process of its own."""
    worker = Worker(name, function, *args)
    try:
        return worker.receive("result", timeout)
    finally:
        worker.stop()


@contextlib.contextmanager
def serving(name: str, timeout: float, function: Callable[..., Any], *args: Any) -> Iterator[Worker]:
    """`function(control, *args)` in a process of its own, from its `control.ready()` to the block's end."""
    worker = Worker(name, function, *args)
    try:
        worker.receive("ready", timeout)
        yield worker
    finally:
        worker.stop()


# -- what the child processes run: the systems' APIs ---------------------------------------------------------


class Counts:
    """Messages a server took, by kind, and waiting for a number of them (from any thread). Each message
    costs the server a plain lock and an add, and a notify only while someone waits: 0.38 us, where a
    Condition's notify_all each time cost 0.66 us (the harness's own share, the same for every system)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1
            if self._waiting:
                self._changed.notify_all()

    def wait(self, kind: str, at_least: int, timeout: float) -> int:
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: self._counts[kind] >= at_least, timeout)
            finally:
                self._waiting -= 1
            return self._counts[kind]


class Endpoint:
    """The RPC server's endpoint (meshbus blocking API and oslo.messaging: methods run in a thread pool)."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def echo(self, ctxt: Any, data: str) -> str:
        return data

    def sink(self, ctxt: Any, data: str) -> None:
        self.counts.add("casts")

    def received(self, ctxt: Any, kind: str, at_least: int = 0, timeout: float = 0.0) -> int:
        """How many `kind` messages (casts, notifications) the server took, once there are `at_least`."""
        return self.counts.wait(kind, at_least, timeout)


class NotificationEndpoint:
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.counts.add("notifications")


class AsyncEndpoint:
    """The RPC server's endpoint for the asyncio API: coroutines, run on the transport's loop."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    async def echo(self, ctxt: Any, data: str) -> str:
        return data

    async def sink(self, ctxt: Any, data: str) -> None:
        self.counts.add("casts")

    async def received(self, ctxt: Any, kind: str, at_least: int = 0, timeout: float = 0.0) -> int:
        # Waiting blocks: a thread does it, not the loop.
        return await asyncio.to_thread(self.counts.wait, kind, at_least, timeout)


class AsyncNotificationEndpoint:
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    async def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.counts.add("notifications")


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self) -> None: ...


class Stack(Protocol):
    """One transport of a system, and what the benchmark makes on it."""

    def rpc_server(self, topic: str, server: str, counts: Counts) -> Service: ...
    def listener(self, counts: Counts) -> Service: ...
    def run(self, operation: str, concurrency: int, seconds: float) -> Run: ...
    def received(self, kind: str, at_least: int, timeout: float) -> int: ...
    def call_nobody(self, timeout: float) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Run:
    count: int
    elapsed: float  # seconds, from the start to the last thread's (task's) end
    latencies: list[float]  # seconds, one per operation


def _threads(operation: Callable[[], object], concurrency: int, seconds: float) -> Run:
    """Calls `operation` from `concurrency` threads, each until `seconds` have passed."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[Exception] = []
    start = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def work(mine: list[float]) -> None:
        start.wait()
        clock = time.perf_counter
        try:
            while (began := clock()) < deadline:
                operation()
                mine.append(clock() - began)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    flat = [latency for mine in latencies for latency in mine]
    return Run(len(flat), time.perf_counter() - began, flat)


async def _tasks(operation: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> Run:
    """Awaits `operation` in `concurrency` tasks, each until `seconds` have passed."""
    latencies: list[float] = []
    clock = time.perf_counter
    deadline = clock() + seconds

    async def work() -> None:
        while (began := clock()) < deadline:
            await operation()
            latencies.append(clock() - began)

    began = clock()
    await asyncio.gather(*(work() for _ in range(concurrency)))
    return Run(len(latencies), clock() - began, latencies)


class _BlockingStack:
    """What meshbus.messaging's blocking API and oslo.messaging's share: one shape of client and notifier
    (client.call(ctxt, method, **args), client.prepare(...), notifier.info(ctxt, event_type, payload))."""

    client: Any
    notifier: Any

    def run(self, operation: str, concurrency: int, seconds: float) -> Run:
        client, notifier = self.client, self.notifier
        operations: dict[str, Callable[[], object]] = {
            "calls": lambda: client.call({}, "echo", data=PAYLOAD),
            "casts": lambda: client.cast({}, "sink", data=PAYLOAD),
            "notifications": lambda: notifier.info({}, "bench.event", {"data": PAYLOAD}),
        }
        return _threads(operations[operation], concurrency, seconds)

    def received(self, kind: str, at_least: int, timeout: float) -> int:
        client = self.client.prepare(timeout=timeout + 10)
        return int(client.call({}, "received", kind=kind, at_least=at_least, timeout=timeout))

    def call_nobody(self, timeout: float) -> None:
        self.client.prepare(topic=NOBODY_TOPIC, timeout=timeout).call({}, "echo", data=PAYLOAD)


class MeshbusStack(_BlockingStack):
    """meshbus.messaging's blocking API: endpoint methods run in the server's thread pool."""

    def __init__(self, url: str) -> None:
        self.transport = messaging.Transport(url)

    @functools.cached_property
    def client(self) -> Any:
        return messaging.RPCClient(self.transport, messaging.Target(topic=TOPIC))

    @functools.cached_property
    def notifier(self) -> Any:
        return messaging.Notifier(self.transport, "bench", topics=[NOTIFY_TOPIC])

    def rpc_server(self, topic: str, server: str, counts: Counts) -> Service:
        target = messaging.Target(topic=topic, server=server)
        return messaging.RPCServer(self.transport, target, [Endpoint(counts)], max_workers=16)

    def listener(self, counts: Counts) -> Service:
        targets = [messaging.Target(topic=NOTIFY_TOPIC)]
        return messaging.NotificationListener(self.transport, targets, [NotificationEndpoint(counts)])

    def close(self) -> None:
        self.transport.close()


@functools.cache
def oslo_configuration() -> Any:
    """oslo.config's global configuration, as services use it (oslo.messaging registers its tracing options
    only there), parsed once per process with no command line and no configuration file."""
    from oslo_config import cfg

    cfg.CONF([], project="meshbus-bench", default_config_files=[])
    return cfg.CONF


class OsloStack(_BlockingStack):
    """oslo.messaging 18 (rabbit:// or, with the plugin, meshbus://), threading executor as services use;
    `durable`: the rabbit driver's durable queues (amqp_durable_queues)."""

    def __init__(self, url: str, *, durable: bool = False) -> None:
        import oslo_messaging
        from oslo_messaging._drivers import amqp

        self.om = oslo_messaging
        self.url = url
        self.conf = oslo_configuration()
        if durable:  # registered here as the rabbit driver registers it, to be set before the driver loads
            self.conf.register_opts(amqp.amqp_opts, group="oslo_messaging_rabbit")
            self.conf.set_override("amqp_durable_queues", True, group="oslo_messaging_rabbit")
        self.transport = oslo_messaging.get_rpc_transport(self.conf, url=url)

    @functools.cached_property
    def notify_transport(self) -> Any:
        return self.om.get_notification_transport(self.conf, url=self.url)

    @functools.cached_property
    def client(self) -> Any:
        return self.om.get_rpc_client(self.transport, self.om.Target(topic=TOPIC))

    @functools.cached_property
    def notifier(self) -> Any:
        return self.om.Notifier(self.notify_transport, "bench", driver="messaging", topics=[NOTIFY_TOPIC])

    def rpc_server(self, topic: str, server: str, counts: Counts) -> Service:
        target = self.om.Target(topic=topic, server=server)
        return self.om.get_rpc_server(self.transport, target, [Endpoint(counts)], executor="threading")  # type: ignore[no-any-return]

    def listener(self, counts: Counts) -> Service:
        targets = [self.om.Target(topic=NOTIFY_TOPIC)]
        endpoints = [NotificationEndpoint(counts)]
        return self.om.get_notification_listener(  # type: ignore[no-any-return]
            self.notify_transport, targets, endpoints, executor="threading"
        )

    def close(self) -> None:
        self.transport.cleanup()
        if "notify_transport" in self.__dict__:
            self.notify_transport.cleanup()


class _OnLoop:
    """An asyncio server or listener, started and stopped from another thread."""

    def __init__(self, transport: Any, service: Any) -> None:
        self.transport = transport
        self.service = service

    def start(self) -> None:
        self.transport.run(self.service.start())

    def stop(self) -> None:
        self.transport.run(self.service.stop())

    def wait(self) -> None:
        self.transport.run(self.service.wait())


class AsyncStack:
    """meshbus.messaging's asyncio API. Its loop (uvloop) is the one a blocking `Transport` runs in a thread
    of its own; everything measured runs on that loop as coroutines, the benchmark's thread only waits."""

    def __init__(self, url: str) -> None:
        self.loop_owner = messaging.Transport(url)
        transport = self.loop_owner.aio
        self.client = messaging.AsyncRPCClient(transport, messaging.Target(topic=TOPIC))
        self.notifier = messaging.AsyncNotifier(transport, "bench", topics=[NOTIFY_TOPIC])
        self.operations: dict[str, Callable[[], Awaitable[object]]] = {
            "calls": lambda: self.client.call({}, "echo", data=PAYLOAD),
            "casts": lambda: self.client.cast({}, "sink", data=PAYLOAD),
            "notifications": lambda: self.notifier.info({}, "bench.event", {"data": PAYLOAD}),
        }

    def rpc_server(self, topic: str, server: str, counts: Counts) -> Service:
        target = messaging.Target(topic=topic, server=server)
        rpc_server = messaging.AsyncRPCServer(self.loop_owner.aio, target, [AsyncEndpoint(counts)])
        return _OnLoop(self.loop_owner, rpc_server)

    def listener(self, counts: Counts) -> Service:
        targets = [messaging.Target(topic=NOTIFY_TOPIC)]
        endpoints = [AsyncNotificationEndpoint(counts)]
        return _OnLoop(
            self.loop_owner, messaging.AsyncNotificationListener(self.loop_owner.aio, targets, endpoints)
        )

    def run(self, operation: str, concurrency: int, seconds: float) -> Run:
        return self.loop_owner.run(_tasks(self.operations[operation], concurrency, seconds))

    def received(self, kind: str, at_least: int, timeout: float) -> int:
        client = self.client.prepare(timeout=timeout + 10)
        call = client.call({}, "received", kind=kind, at_least=at_least, timeout=timeout)
        return int(self.loop_owner.run(call))

    def call_nobody(self, timeout: float) -> None:
        client = self.client.prepare(topic=NOBODY_TOPIC, timeout=timeout)
        self.loop_owner.run(client.call({}, "echo", data=PAYLOAD))

    def close(self) -> None:
        self.loop_owner.close()


def open_stack(system: str, url: str) -> Stack:
    stacks: dict[str, Callable[[str], Stack]] = {
        "blocking": MeshbusStack,
        "asyncio": AsyncStack,
        "oslo_meshbus": OsloStack,
        "rabbit": OsloStack,
        "rabbit_durable": functools.partial(OsloStack, durable=True),
    }
    return stacks[system](url)


# -- workloads (each runs in a client process of its own) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    kind: str  # calls, casts, notifications
    concurrency: int
    seconds: float
    warmup: float


@dataclass(frozen=True, slots=True)
class Rates:
    rate: float  # per second
    p50_ms: float
    p99_ms: float


def measure_rate(control: Control, system: str, url: str, job: Job) -> Rates:
    """Calls: round trips per second and their latency. Casts, notifications: messages per second from the
    first sent to the last the server (listener) took."""
    stack = open_stack(system, url)
    try:
        if job.kind == "calls":
            stack.run(job.kind, job.concurrency, job.warmup)
            run = stack.run(job.kind, job.concurrency, job.seconds)
            latencies = statistics.quantiles(run.latencies, n=100, method="inclusive")
            return Rates(run.count / run.elapsed, latencies[49] * 1000, latencies[98] * 1000)
        taken = stack.received(job.kind, 0, 0)
        taken += stack.run(job.kind, job.concurrency, job.warmup).count
        stack.received(job.kind, taken, DRAIN_TIMEOUT)
        began = time.perf_counter()
        run = stack.run(job.kind, job.concurrency, job.seconds)
        wanted = taken + run.count
        got = stack.received(job.kind, wanted, DRAIN_TIMEOUT)
        if got < wanted:
            raise BenchError(
                f"the server took {got - taken} of {run.count} {job.kind} in {DRAIN_TIMEOUT:.0f} s"
            )
        return Rates(run.count / (time.perf_counter() - began), float("nan"), float("nan"))
    finally:
        stack.close()


def measure_call_to_nobody(control: Control, system: str, url: str, timeout: float) -> tuple[float, str]:
    """Milliseconds until a call to a topic nobody serves fails (median of the attempts that fit in a second,
    at least one), and the error's type."""
    stack = open_stack(system, url)
    try:
        durations: list[float] = []
        error = "no error"
        while not durations or (len(durations) < 20 and sum(durations) < 1.0):
            began = time.perf_counter()
            try:
                stack.call_nobody(timeout)
            except Exception as raised:
                error = type(raised).__name__
            durations.append(time.perf_counter() - began)
        return statistics.median(durations) * 1000, error
    finally:
        stack.close()


def serve(control: Control, system: str, url: str) -> None:
    """The RPC server and notification listener every workload talks to, until the harness says stop."""
    stack = open_stack(system, url)
    counts = Counts()
    services = [stack.rpc_server(TOPIC, SERVER, counts), stack.listener(counts)]
    for service in services:
        service.start()
    control.ready()
    control.wait_stop()
    for service in services:
        service.stop()
    for service in services:
        service.wait()
    stack.close()


def hold_idle_servers(control: Control, system: str, url: str, count: int) -> None:
    """`count` idle RPC servers, each on a transport (a connection) of its own, as services have."""
    stacks = [open_stack(system, url) for _ in range(count)]
    servers = [stack.rpc_server(IDLE_TOPIC, f"idle-{index}", Counts()) for index, stack in enumerate(stacks)]
    for server in servers:
        server.start()
    control.ready()
    control.wait_stop()

    def stop(index: int) -> None:
        servers[index].stop()
        servers[index].wait()
        stacks[index].close()

    # In parallel: oslo.messaging's servers take about a second each to stop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(stop, range(count)))


# -- brokers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    pid: int  # the process whose memory is measured
    url: str


@contextlib.contextmanager
def broker_for(system: System) -> Iterator[Broker]:
    if system.broker == "rabbit":
        if (reason := rabbit.missing()) is not None:
            raise BenchError(f"{reason}, or run with --only meshbus")
        with rabbit.rabbitmq("bench", cpus=ROUTER_CPUS) as node:
            yield Broker(node.pid, f"rabbit://guest:guest@{node.host}:{node.port}/")
        return
    with router([str(ROUTER), "router"]) as (child, host_port):
        yield Broker(child.pid, f"meshbus://{host_port}/")


# -- the harness ------------------------------------------------------------------------------------------


class Figures:
    """Every figure printed so far, by name; prints each with the rabbit driver's figure of the same run."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(
        self,
        system: System,
        name: str,
        value: float,
        unit: str,
        peer_name: str | None = None,
        runs: Sequence[float] = (),
    ) -> None:
        self.values[name] = value
        peer = None
        if not system.peer and peer_name is not None:
            peer = self.values.get(peer_name)
        report(Figure(name, value, unit, "rabbit" if peer is not None else None, peer, runs))


def measure(system: System, settings: Settings, figures: Figures) -> None:
    print(f"# {system.key}: {system.title}", flush=True)
    kinds = [kind for kind in system.kinds if settings.kinds is None or kind in settings.kinds]
    with broker_for(system) as broker, serving(f"{system.key} server", 120, serve, system.key, broker.url):
        for kind in kinds:
            for concurrency in system.concurrency:
                job = Job(kind, concurrency, settings.seconds, settings.warmup)
                measure_load(system, broker, job, figures, settings.repeat)
        if system is RABBIT_DURABLE or settings.kinds is not None:
            return  # its other figures are the rabbit driver's, or were not asked for
        measure_nobody(system, broker, settings.nobody_timeout, figures)
    if system.key == "asyncio":
        return  # the router sees the same connections and links from the asyncio API as from the blocking one
    # A fresh broker: what the load left behind (queues, garbage to collect) would blur the memory figure.
    with broker_for(system) as broker:
        per_server = idle_memory(system, broker, settings.idle_servers)
    name = "broker_mem_per_idle_rpc_server"
    figures.add(system, f"{system.key}_{name}", per_server, "KiB", f"rabbit_{name}")


def measure_load(system: System, broker: Broker, job: Job, figures: Figures, repeat: int) -> None:
    """One figure: the run of median rate of `repeat` (each in a client process of its own)."""
    timeout = 2 * (job.seconds + job.warmup) + DRAIN_TIMEOUT + 60
    runs = [
        in_child(f"{system.key} client", timeout, measure_rate, system.key, broker.url, job)
        for _ in range(repeat)
    ]
    rates = sorted(runs, key=lambda run: run.rate)[len(runs) // 2]
    name = system.name(job.kind, job.concurrency)
    # The asyncio API's 100 tasks are compared with the rabbit driver's 16 threads (its goal figure).
    peer = RABBIT.name(job.kind, min(job.concurrency, GOAL_CONCURRENCY))
    figures.add(system, name, rates.rate, f"{job.kind}/s", peer, [run.rate for run in runs])
    durable = RABBIT_DURABLE.name(job.kind, GOAL_CONCURRENCY)
    if not system.peer and job.concurrency >= GOAL_CONCURRENCY and durable in figures.values:
        # Notifications again, against the rabbit driver with durability matched (not the goal's peer).
        matched = f"{name}_durability_matched"
        report(Figure(matched, rates.rate, f"{job.kind}/s", "rabbit_durable", figures.values[durable]))
    if job.kind == "calls":
        figures.add(system, f"{name}_p50", rates.p50_ms, "ms", f"{peer}_p50")
        figures.add(system, f"{name}_p99", rates.p99_ms, "ms", f"{peer}_p99")


def measure_nobody(system: System, broker: Broker, call_timeout: float, figures: Figures) -> None:
    timeout = call_timeout * 25 + 60
    failed_after, error = in_child(
        f"{system.key} client", timeout, measure_call_to_nobody, system.key, broker.url, call_timeout
    )
    name = "call_to_nobody_fails_after"
    figures.add(system, f"{system.key}_{name}", failed_after, "ms", f"rabbit_{name}")
    print(f"# {system.key}_{name}: {error} (call time-out {call_timeout:g} s)", flush=True)


def idle_memory(system: System, broker: Broker, count: int) -> float:
    """Broker (router) RSS growth per idle RPC server while `count` are running, in KiB."""
    timeout = 120 + count
    with serving("idle servers (warm-up)", timeout, hold_idle_servers, system.key, broker.url, 10):
        pass  # the first servers load code paths and grow tables once
    time.sleep(1.0)
    before = rss_kib(broker.pid)
    with serving("idle servers", timeout, hold_idle_servers, system.key, broker.url, count):
        time.sleep(2.0)  # let the broker finish its per-connection work (logging, timers, queues)
        after = rss_kib(broker.pid)
    return (after - before) / count


def goal_check(figures: Figures, systems: Sequence[System]) -> None:
    """Issue 4: calls at 16 threads >= 10x the rabbit driver's, p99 < 5 ms; casts, notifications >= 10x."""
    at = f"at {GOAL_CONCURRENCY} threads >= {GOAL_RATIO:g}x rabbit"
    print(
        f"# goal: calls {at} with p99 < {GOAL_P99_MS:g} ms; casts and notifications {at}",
        flush=True,
    )
    values = figures.values
    for system in systems:
        if system.peer:
            continue
        for kind in ("calls", "casts", "notifications"):
            name, peer = system.name(kind, GOAL_CONCURRENCY), RABBIT.name(kind, GOAL_CONCURRENCY)
            if name not in values or peer not in values:
                continue
            ratio = values[name] / values[peer]
            met = ratio >= GOAL_RATIO
            text = f"goal {name}: {ratio:.1f}x rabbit"
            if kind == "calls":
                p99 = values[f"{name}_p99"]
                met = met and p99 < GOAL_P99_MS
                text += f", p99 {p99:.2f} ms"
            if kind == "notifications" and (durable := RABBIT_DURABLE.name(kind, GOAL_CONCURRENCY)) in values:
                text += f" ({values[name] / values[durable]:.1f}x rabbit with durable queues)"
            print(f"{text}: {'met' if met else 'NOT met'}", flush=True)


def plugin_missing() -> str | None:
    """Why (c) cannot run yet, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eventlet's deprecation, which oslo.messaging imports
            importlib.import_module(PLUGIN_MODULE)
    except ImportError as error:
        return f"{PLUGIN_MODULE} is not importable yet ({error})"
    return None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke run")
    parser.add_argument("--only", choices=["meshbus", "rabbit"], help="run only these systems")
    parser.add_argument("--seconds", type=float, help="seconds per measured run (default 5; --quick 1)")
    parser.add_argument(
        "--idle-servers", type=int, help="idle RPC servers for the memory figure (default 100)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each load figure; the median is reported (default 1)"
    )
    parser.add_argument(
        "--kinds",
        help="comma-separated load figures to measure (calls, casts, notifications) and nothing else",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    kinds = None if args.kinds is None else tuple(args.kinds.split(","))
    if kinds is not None and (unknown := set(kinds) - {"calls", "casts", "notifications"}):
        parser.error(
            f"--kinds: unknown {', '.join(sorted(unknown))}; choose from calls, casts, notifications"
        )
    return Settings(
        seconds=args.seconds or (1.0 if quick else 5.0),
        warmup=0.3 if quick else 1.0,
        idle_servers=args.idle_servers or (10 if quick else 100),
        # The rabbit driver waits out the time-out: 10 s as the issue measured it, 2 s in a smoke run.
        nobody_timeout=2.0 if quick else 10.0,
        only=args.only,
        kinds=kinds,
        repeat=max(args.repeat, 1),
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    stop_on_sigterm()
    print(f"# broker/router on cpu {sorted(ROUTER_CPUS)}, servers and clients on cpu {sorted(CLIENT_CPUS)}")
    figures = Figures()
    systems = settings.systems()
    failed = False
    for system in systems:
        if system.key == "oslo_meshbus" and (missing := plugin_missing()) is not None:
            print(f"# {system.key}: skipped, {missing}", flush=True)
            continue
        try:
            measure(system, settings, figures)
        except (BenchError, rabbit.RabbitError) as error:  # the other systems' figures are still worth having
            print(f"messaging_bench: {system.key}: {error}", file=sys.stderr, flush=True)
            failed = True
    goal_check(figures, systems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
