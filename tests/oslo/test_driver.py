"""The oslo.messaging driver plugin, through oslo.messaging 18.x's public API against a real router.

Every test opens its transports, servers and listeners through `Oslo`, which stops and cleans them up when
the test ends, and uses topics of its own on the session's shared router.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import oslo_messaging
import pytest
from oslo_messaging.rpc import dispatcher
from oslo_serialization import jsonutils

import meshbus.messaging as mb
from meshbus.users import add_user
from tests.conftest import Router, StartRouter
from tests.messaging.peers import free_port
from tests.oslo.conf import configuration

WAIT = 10.0  # seconds a test waits for something that should happen at once
PRIORITIES = ["audit", "debug", "info", "warn", "error", "critical", "sample"]
DRIVER_OPTIONS = "oslo_messaging_meshbus"


class QuotaExceeded(Exception):
    """An application's exception, rebuilt at the caller only if this module is an allowed one."""


class Seen:
    """What endpoints received, from whatever thread; tests wait for it with a deadline."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = threading.Condition()

    def add(self, item: Any) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Any]], bool]) -> list[Any]:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.items), WAIT), f"still {self.items}"
            return list(self.items)

    def wait_count(self, count: int) -> list[Any]:
        return self.wait_for(lambda items: len(items) >= count)


class Oslo:
    """Opens oslo.messaging objects on the `meshbus://` URL for a test, and closes them all when it ends."""

    def __init__(self, router: Router) -> None:
        self.url = f"meshbus://{router.host}:{router.port}/"
        self._servers: list[Any] = []
        self._transports: list[Any] = []

    def rpc_transport(self, url: str | None = None, **options: Any) -> Any:
        return self._opened(oslo_messaging.get_rpc_transport(configuration(), url or self.url, **options))

    def notification_transport(self) -> Any:
        return self._opened(oslo_messaging.get_notification_transport(configuration(), self.url))

    def _opened(self, transport: Any) -> Any:
        self._transports.append(transport)
        return transport

    def server(self, transport: Any, target: Any, endpoints: list[object]) -> Any:
        return self._started(
            oslo_messaging.get_rpc_server(transport, target, endpoints, executor="threading")
        )

    def listener(self, transport: Any, topic: str, endpoints: list[object], **options: Any) -> Any:
        targets = [oslo_messaging.Target(topic=topic)]
        return self._started(
            oslo_messaging.get_notification_listener(
                transport, targets, endpoints, executor="threading", **options
            )
        )

    def batch_listener(self, transport: Any, topic: str, endpoints: list[object], **options: Any) -> Any:
        targets = [oslo_messaging.Target(topic=topic)]
        return self._started(
            oslo_messaging.get_batch_notification_listener(
                transport, targets, endpoints, executor="threading", **options
            )
        )

    def _started(self, server: Any) -> Any:
        server.start()
        self._servers.append(server)
        return server

    def close(self) -> None:
        for server in self._servers:
            server.stop()
        for server in self._servers:
            server.wait()
        for transport in self._transports:
            transport.cleanup()


@pytest.fixture
def oslo(default_router: Router) -> Iterator[Oslo]:
    opened = Oslo(default_router)
    yield opened
    opened.close()


@pytest.fixture
def topic() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class Service:
    """An RPC endpoint that says which server ran it and records what it was asked."""

    def __init__(self, name: str, seen: Seen | None = None) -> None:
        self.name = name
        self.seen = seen or Seen()
        self.release = threading.Event()

    def echo(self, ctxt: dict[str, Any], text: str) -> dict[str, Any]:
        return {"text": text, "server": self.name, "user": ctxt.get("user")}

    def record(self, ctxt: dict[str, Any], n: int) -> None:
        self.seen.add((self.name, n))

    def fail(self, ctxt: dict[str, Any], text: str) -> None:
        raise ValueError(text)

    def exceed(self, ctxt: dict[str, Any], limit: int) -> None:
        raise QuotaExceeded(f"quota of {limit} exceeded")

    def work(self, ctxt: dict[str, Any], seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    def block(self, ctxt: dict[str, Any]) -> str:
        self.seen.add((self.name, "blocked"))
        self.release.wait(WAIT)
        return "late"

    def given(self, ctxt: dict[str, Any], value: Any) -> Any:
        return value

    def grow(self, ctxt: dict[str, Any], size: int) -> str:
        return "x" * size

    def _private(self, ctxt: dict[str, Any]) -> str:
        return "secret"


def rpc_target(topic: str, server: str | None = None, **fields: Any) -> Any:
    return oslo_messaging.Target(topic=topic, server=server, **fields)


def client(transport: Any, topic: str, **options: Any) -> Any:
    return oslo_messaging.get_rpc_client(transport, rpc_target(topic), **options)


# -- RPC -----------------------------------------------------------------------------------------------------


def test_call_returns_the_result_and_carries_the_context(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])

    result = client(transport, topic).call({"user": "alice"}, "echo", text="hello")

    assert result == {"text": "hello", "server": "s0", "user": "alice"}


def test_the_thread_oslo_polls_the_driver_from_waits_its_turn_when_woken(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    server = oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])
    assert client(transport, topic).call({}, "echo", text="x")["server"] == "s0"
    poller = server.listener._listen_thread  # oslo's PollStyleListenerAdapter's, made for our listener
    assert os.sched_getscheduler(poller.native_id) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller's thread is the application's"


def test_what_a_stopped_server_is_still_sent_goes_to_another_server(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    stopped = oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])
    oslo.server(oslo.rpc_transport(), rpc_target(topic, "s1"), [Service("s1")])
    caller = client(oslo.rpc_transport(), topic, timeout=WAIT)
    assert {caller.call({}, "echo", text="x")["server"] for _ in range(8)} == {"s0", "s1"}

    stopped.stop()  # its links stay attached until its work is done (wait), their credit drained

    assert {caller.call({}, "echo", text="x")["server"] for _ in range(8)} == {"s1"}


def test_calls_to_a_topic_are_shared_and_a_named_server_gets_its_own(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    for name in ("s0", "s1"):
        oslo.server(transport, rpc_target(topic, name), [Service(name)])
    caller = client(transport, topic)

    assert {caller.call({}, "echo", text="x")["server"] for _ in range(8)} == {"s0", "s1"}
    assert {caller.prepare(server="s1").call({}, "echo", text="x")["server"] for _ in range(4)} == {"s1"}


def test_a_cast_runs_once_on_one_server(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    seen = Seen()
    for name in ("s0", "s1"):
        oslo.server(transport, rpc_target(topic, name), [Service(name, seen)])

    for n in range(10):
        client(transport, topic).cast({}, "record", n=n)

    seen.wait_count(10)
    client(transport, topic).call({}, "echo", text="barrier")
    assert sorted(n for _, n in seen.items) == list(range(10))


def test_values_json_cannot_hold_arrive_as_oslos_own_drivers_write_them(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])
    value = {
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "aware": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "raw": b"id",
        "ids": {3},
        "error": ValueError("x"),
    }
    # As with the rabbit driver: jsonutils.dumps, oslo.serialization's to_primitive for what JSON cannot hold.
    assert client(transport, topic).call({}, "given", value=value) == json.loads(jsonutils.dumps(value))


def test_a_cast_json_cannot_encode_raises_at_the_caller_and_the_transport_goes_on(
    oslo: Oslo, topic: str
) -> None:
    transport = oslo.rpc_transport()
    seen = Seen()
    oslo.server(transport, rpc_target(topic, "s0"), [Service("s0", seen)])
    circular: dict[str, Any] = {}
    circular["self"] = circular

    with pytest.raises(ValueError, match="Circular reference"):  # encoded on the I/O thread, raised here
        client(transport, topic).cast({}, "record", n=circular)

    client(transport, topic).cast({}, "record", n=1)
    assert seen.wait_count(1) == [("s0", 1)]


def test_a_fanout_cast_reaches_every_server_once(oslo: Oslo, topic: str) -> None:
    transport = oslo.rpc_transport()
    seen = Seen()
    names = ["s0", "s1", "s2"]
    for name in names:
        oslo.server(oslo.rpc_transport(), rpc_target(topic, name), [Service(name, seen)])
    fanout = client(transport, topic).prepare(fanout=True)

    fanout.cast({}, "record", n=1)
    fanout.cast({}, "record", n=2)

    seen.wait_count(6)
    for name in names:  # a call to each server after its copies were taken: nothing more is on its way
        assert client(transport, topic).prepare(server=name).call({}, "echo", text="x")["server"] == name
    assert sorted(seen.items) == sorted((name, n) for name in names for n in (1, 2))


def test_version_and_namespace_errors_are_raised_at_the_caller(oslo: Oslo, topic: str) -> None:
    class Versioned(Service):
        target = oslo_messaging.Target(namespace="compute", version="1.3")

    oslo.server(oslo.rpc_transport(), rpc_target(topic, "s0"), [Versioned("s0")])
    caller = client(oslo.rpc_transport(allowed_remote_exmods=[dispatcher.__name__]), topic)
    compute = caller.prepare(namespace="compute", version="1.2")

    assert compute.call({}, "echo", text="x")["server"] == "s0"
    with pytest.raises(oslo_messaging.UnsupportedVersion, match=r"version 2\.0"):
        compute.prepare(version="2.0").call({}, "echo", text="x")
    with pytest.raises(oslo_messaging.UnsupportedVersion):
        caller.prepare(namespace="network", version="1.0").call({}, "echo", text="x")
    with pytest.raises(oslo_messaging.NoSuchMethod, match="missing"):
        compute.call({}, "missing")
    with pytest.raises(oslo_messaging.NoSuchMethod, match="_private"):
        compute.call({}, "_private")
    # A caller that does not allow oslo's dispatcher module gets them as RemoteError, as with any driver.
    with pytest.raises(oslo_messaging.RemoteError) as raised:
        client(oslo.rpc_transport(), topic).prepare(namespace="compute").call({}, "missing")
    assert raised.value.exc_type == "NoSuchMethod"


def test_remote_exceptions_are_rebuilt_from_allowed_modules_only(oslo: Oslo, topic: str) -> None:
    oslo.server(oslo.rpc_transport(), rpc_target(topic, "s0"), [Service("s0")])
    caller = client(oslo.rpc_transport(), topic)
    allowing = client(oslo.rpc_transport(allowed_remote_exmods=[__name__]), topic)

    with pytest.raises(ValueError, match="bad value 42"):
        caller.call({}, "fail", text="bad value 42")
    with pytest.raises(QuotaExceeded, match="quota of 7 exceeded"):
        allowing.call({}, "exceed", limit=7)
    with pytest.raises(oslo_messaging.RemoteError) as raised:
        caller.call({}, "exceed", limit=7)
    assert (raised.value.exc_type, raised.value.value) == ("QuotaExceeded", "quota of 7 exceeded")


def test_a_call_times_out(oslo: Oslo, topic: str) -> None:
    service = Service("s0")
    oslo.server(oslo.rpc_transport(), rpc_target(topic, "s0"), [service])
    try:
        with pytest.raises(oslo_messaging.MessagingTimeout):
            client(oslo.rpc_transport(), topic, timeout=0.3).call({}, "block")
        assert service.seen.wait_count(1) == [("s0", "blocked")]
    finally:
        service.release.set()


def test_a_monitored_call_lives_on_heartbeats_and_fails_soon_after_its_server_dies(
    oslo: Oslo, topic: str
) -> None:
    service = Service("s0")
    server_transport = oslo.rpc_transport()
    oslo.server(server_transport, rpc_target(topic, "s0"), [service])
    caller = client(oslo.rpc_transport(), topic, timeout=30, call_monitor_timeout=2)

    # Longer than the monitor's 2 s: only the server's heartbeats (every second) keep the call alive.
    assert caller.call({}, "work", seconds=3) == "done"

    with ThreadPoolExecutor(1) as thread:
        call = thread.submit(caller.call, {}, "block")
        try:
            service.seen.wait_count(1)
            server_transport.cleanup()  # the server's connection goes while it works: no more heartbeats
            died = time.monotonic()
            with pytest.raises(oslo_messaging.MessagingTimeout, match="call_monitor_timeout"):
                call.result()
            assert time.monotonic() - died < 10.0  # the monitor's 2 s, not the call's 30 s time-out
        finally:
            service.release.set()


def test_sends_to_nobody_fail_at_once(oslo: Oslo, topic: str) -> None:
    caller = client(oslo.rpc_transport(), topic, timeout=30)

    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match=topic):
        caller.call({}, "echo", text="x")
    assert time.monotonic() - started < 5.0
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match=topic):
        caller.cast({}, "record", n=1)
    caller.prepare(fanout=True).cast({}, "record", n=1)  # dropped, as a broker drops it: no error


def test_with_retry_0_sends_fail_at_once_while_no_router_is_reached(oslo: Oslo, topic: str) -> None:
    # oslo's retry=0: no reconnection attempt, where the rabbit driver raises at once.
    caller = client(oslo.rpc_transport(f"meshbus://127.0.0.1:{free_port()}/"), topic, timeout=30, retry=0)
    not_reached = r"not connected to a router \(.*\): is one running at .*\(retry=0\)"

    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match=not_reached):
        caller.call({}, "echo", text="x")
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match=not_reached):
        caller.cast({}, "record", n=1)
    assert time.monotonic() - started < 5.0


def test_a_server_holds_no_more_requests_than_its_prefetch(oslo: Oslo, topic: str) -> None:
    server_transport = oslo.rpc_transport()
    server_transport.conf.set_override("prefetch", 1, group=DRIVER_OPTIONS)
    service = Service("s0")
    oslo.server(server_transport, rpc_target(topic, "s0"), [service])
    client_transport = oslo.rpc_transport()
    client_transport.conf.set_override("send_timeout", 0.5, group=DRIVER_OPTIONS)
    caller = client(client_transport, topic)
    try:
        caller.cast({}, "block")  # taken: the server's one credit on its topic is held while it runs
        with pytest.raises(oslo_messaging.MessagingTimeout):
            caller.cast({}, "block")  # the router keeps it: no server takes it within the time-out
        assert service.seen.wait_count(1) == [("s0", "blocked")]
    finally:
        service.release.set()
    service.seen.wait_count(2)  # credit came back: the router delivered the one it kept


def test_the_transport_fails_over_to_the_next_host(oslo: Oslo, topic: str, default_router: Router) -> None:
    with socket.socket() as unused:  # a port nobody listens on once closed
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    url = f"meshbus://127.0.0.1:{dead},{default_router.host}:{default_router.port}/"
    transport = oslo.rpc_transport(url)
    oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])

    assert client(transport, topic).call({}, "echo", text="x")["server"] == "s0"


def test_after_its_router_restarts_a_service_serves_and_listens_again(
    router: StartRouter, topic: str
) -> None:
    config = {"listener": [{"port": free_port()}]}  # the restarted router comes back on the same port
    first = router(config)
    oslo = Oslo(first)
    try:
        oslo.server(oslo.rpc_transport(), rpc_target(topic, "s0"), [Service("s0")])
        recorder = Recorder()
        notifications = oslo.notification_transport()
        oslo.listener(notifications, topic, [recorder])
        caller = client(oslo.rpc_transport(), topic, timeout=WAIT)
        assert caller.call({}, "echo", text="before")["server"] == "s0"

        first.kill()
        router(config, name=first.name)
        # The transports reconnect and the server and the listener re-attach: until then, a call fails at
        # once (nobody serves its topic yet, or its connection is still down).
        deadline = time.monotonic() + WAIT
        while True:
            try:
                answer = caller.call({}, "echo", text="after")
                break
            except oslo_messaging.MessageDeliveryFailure:
                assert time.monotonic() < deadline, "no server answered after the router came back"
                time.sleep(0.1)
        assert answer["server"] == "s0"
        notifier(notifications, topic).info({}, "compute.after", {"number": 1})
        assert recorder.seen.wait_count(1)[0][4] == "compute.after"
    finally:
        oslo.close()


def test_messages_larger_than_the_router_takes_fail_at_once_saying_why(
    router: StartRouter, topic: str
) -> None:
    oslo = Oslo(router({"listener": [{"max_message_size": 1 << 20}]}))
    try:
        oslo.server(oslo.rpc_transport(), rpc_target(topic, "s0"), [Service("s0")])
        caller = client(oslo.rpc_transport(), topic, timeout=30)
        started = time.monotonic()
        with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="message-size-exceeded"):
            caller.call({}, "given", value="x" * (2 << 20))
        with pytest.raises(oslo_messaging.RemoteError, match="the router refused the server's reply"):
            caller.call({}, "grow", size=2 << 20)
        assert time.monotonic() - started < 5.0
    finally:
        oslo.close()


def test_the_virtual_host_in_the_url_is_a_namespace_of_its_own(
    oslo: Oslo, topic: str, default_router: Router
) -> None:
    base = f"meshbus://{default_router.host}:{default_router.port}/"
    oslo.server(oslo.rpc_transport(base + "nova"), rpc_target(topic, "s0"), [Service("s0")])

    assert client(oslo.rpc_transport(base + "nova"), topic).call({}, "echo", text="x")["server"] == "s0"
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="anycast/cinder/"):
        client(oslo.rpc_transport(base + "cinder"), topic, timeout=30).call({}, "echo", text="x")


def test_credentials_in_the_url_log_in_with_sasl_plain(
    oslo: Oslo, topic: str, router: Callable[[Any], Router], tmp_path: Path
) -> None:
    password = "wonder:land@1"  # characters the URL must carry percent-encoded
    add_user(tmp_path / "users.txt", "alice", password)
    secured: Router = router(
        {"router": {"users_file": str(tmp_path / "users.txt")}, "listener": [{"authenticate_peer": True}]}
    )
    transport = oslo.rpc_transport(
        f"meshbus://alice:{quote(password, safe='')}@{secured.host}:{secured.port}/"
    )
    oslo.server(transport, rpc_target(topic, "s0"), [Service("s0")])

    assert client(transport, topic).call({}, "echo", text="x")["server"] == "s0"
    assert secured.wait_for_log(r"connection opened: .* user=alice", WAIT) is not None


def test_a_subscription_the_router_refuses_fails_the_server_start(
    oslo: Oslo, router: Callable[[Any], Router]
) -> None:
    closed = "openstack.org/om/rpc/anycast/openstack/closed"
    refusing = router({"address": [{"prefix": closed, "distribution": "unavailable"}]})
    transport = oslo.rpc_transport(f"meshbus://{refusing.host}:{refusing.port}/")

    with pytest.raises(oslo_messaging.ServerListenError, match=re.escape(closed)):
        oslo.server(transport, rpc_target("closed", "s0"), [Service("s0")])


# -- notifications -------------------------------------------------------------------------------------------


class Recorder:
    """A notification endpoint with a method per priority."""

    def __init__(self, name: str = "listener", seen: Seen | None = None) -> None:
        self.name = name
        self.seen = seen or Seen()

    def _record(
        self, priority: str, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> Any:
        self.seen.add((self.name, priority, ctxt, publisher_id, event_type, payload, metadata))
        return None

    def __getattr__(self, priority: str) -> Callable[..., Any]:
        if priority not in PRIORITIES:
            raise AttributeError(priority)
        return lambda *arguments: self._record(priority, *arguments)


def notifier(transport: Any, topic: str) -> Any:
    return oslo_messaging.Notifier(
        transport, publisher_id="compute.host1", driver="messagingv2", topics=[topic]
    )


def test_notifications_of_every_priority(oslo: Oslo, topic: str) -> None:
    transport = oslo.notification_transport()
    recorder = Recorder()
    oslo.listener(transport, topic, [recorder])
    publisher = notifier(transport, topic)

    # (oslo's notifier sends a context only if it is a RequestContext: a dict arrives as {})
    for number, priority in enumerate(PRIORITIES):
        getattr(publisher, priority)({}, f"compute.{priority}", {"number": number})

    seen = recorder.seen.wait_count(len(PRIORITIES))
    # Each priority has an address of its own: the notifier does not wait for one before the next, so
    # they may arrive in any order.
    assert sorted((pay["number"], p, c, pub, e) for _, p, c, pub, e, pay, _ in seen) == [
        (number, priority, {}, "compute.host1", f"compute.{priority}")
        for number, priority in enumerate(PRIORITIES)
    ]
    assert all(set(metadata) == {"message_id", "timestamp"} for *_, metadata in seen)


def test_each_pool_gets_every_notification_and_its_members_share_them(oslo: Oslo, topic: str) -> None:
    seen = Seen()
    for name, pool in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        oslo.listener(oslo.notification_transport(), topic, [Recorder(name, seen)], pool=pool)
    publisher = notifier(oslo.notification_transport(), topic)

    for number in range(6):
        publisher.info({}, "compute.update", {"number": number})

    received = seen.wait_count(12)
    per_listener = {
        name: sorted(payload["number"] for who, *_, payload, _ in received if who == name)
        for name in ("a1", "a2", "b1")
    }
    assert per_listener["b1"] == list(range(6))
    assert sorted(per_listener["a1"] + per_listener["a2"]) == list(range(6))
    assert per_listener["a1"] and per_listener["a2"]


def test_a_requeued_notification_is_delivered_again(oslo: Oslo, topic: str) -> None:
    seen = Seen()

    class Flaky:
        def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> Any:
            seen.add(metadata["message_id"])
            return oslo_messaging.NotificationResult.REQUEUE if len(seen.items) == 1 else None

    transport = oslo.notification_transport()
    oslo.listener(transport, topic, [Flaky()], allow_requeue=True)

    notifier(transport, topic).info({}, "compute.update", {})

    first, again = seen.wait_count(2)
    assert first == again


def test_a_batch_listener_gets_full_batches_and_partial_ones_after_the_batch_timeout(
    oslo: Oslo, topic: str
) -> None:
    seen = Seen()

    class Batches:
        def info(self, messages: list[dict[str, Any]]) -> None:
            seen.add(sorted(message["payload"]["number"] for message in messages))

    transport = oslo.notification_transport()
    oslo.batch_listener(transport, topic, [Batches()], batch_size=3, batch_timeout=WAIT)
    oslo.batch_listener(transport, f"{topic}-slow", [Batches()], batch_size=5, batch_timeout=0.2)
    publisher = notifier(transport, topic)

    # A notifier returns once its notification was acknowledged: the batch's three are sent at once.
    with ThreadPoolExecutor(3) as threads:
        list(threads.map(lambda n: publisher.info({}, "compute.update", {"number": n}), range(3)))
    notifier(transport, f"{topic}-slow").info({}, "compute.update", {"number": 9})

    assert seen.wait_count(2) == [[0, 1, 2], [9]]


# -- with meshbus.messaging on the other end -----------------------------------------------------------------


def test_oslo_and_meshbus_messaging_call_each_other(oslo: Oslo, topic: str) -> None:
    with mb.Transport(oslo.url) as library:
        library_server = mb.RPCServer(library, mb.Target(topic=f"{topic}-mb", server="m0"), [Service("m0")])
        library_server.start()
        try:
            oslo.server(oslo.rpc_transport(), rpc_target(topic, "o0"), [Service("o0")])
            from_oslo = client(oslo.rpc_transport(), f"{topic}-mb")
            from_library = mb.RPCClient(library, mb.Target(topic=topic))

            assert from_oslo.call({"user": "bob"}, "echo", text="hi") == {
                "text": "hi",
                "server": "m0",
                "user": "bob",
            }
            assert from_library.call({"user": "bob"}, "echo", text="hi") == {
                "text": "hi",
                "server": "o0",
                "user": "bob",
            }
            with pytest.raises(ValueError, match="from oslo"):
                from_library.call({}, "fail", text="from oslo")
            with pytest.raises(ValueError, match="from meshbus"):
                from_oslo.call({}, "fail", text="from meshbus")
        finally:
            library_server.stop()
            library_server.wait()


def test_oslo_config_generator_documents_the_drivers_options(tmp_path: Path) -> None:
    from oslo_config import cfg, generator

    conf = cfg.ConfigOpts()
    generator.register_cli_opts(conf)
    sample = tmp_path / "sample.conf"
    conf(["--namespace", "meshbus.oslo", "--output-file", str(sample)])
    generator.generate(conf)
    text = sample.read_text()
    assert f"[{DRIVER_OPTIONS}]" in text
    assert "#prefetch = 64" in text
    assert "#send_timeout = 60.0" in text
