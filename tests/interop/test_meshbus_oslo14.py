"""meshbus.messaging and an oslo.messaging 14.9.1 service (its AMQP 1.0 driver, `amqp://` URLs) calling and
notifying each other through a meshbus router, both ways.

The oslo side is tests/oslo14_peer.py in the oslo 14.9.1 virtualenv (tests/oslo14.py); the meshbus side runs
in the test process. Servers and listeners of either side start once for the module, on topics of their own
on the session's shared router (`_shared_router`: `default_router` is the same router, per test); each test
tells its messages apart by values of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from meshbus.messaging import (
    AsyncRPCClient,
    AsyncTransport,
    MessageUndeliverable,
    MessagingTimeout,
    NotificationListener,
    Notifier,
    RemoteError,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from tests import cached, oslo14
from tests.conftest import Router
from tests.oslo14 import PRIORITIES, Peer, Start, notify_every_priority, printed, url

# The first test may make the virtualenv: pip on a cold cache takes a minute or more.
pytestmark = pytest.mark.timeout(cached.INSTALL_TIMEOUT + 60)

T = TypeVar("T")

WAIT = 15.0  # seconds for something that should happen at once (oslo peers are slow to start)
OSLO_SERVERS = "mb-to-oslo"  # topic of the oslo RPC servers s1 and s2
OSLO_NOTIFY = "mb-to-oslo-notify"  # topic of the oslo notification listener
MESHBUS_SERVERS = "oslo-to-mb"  # topic of the meshbus RPC servers m1 and m2
MESHBUS_NOTIFY = "oslo-to-mb-notify"  # topic of the meshbus notification listener
ADMIN = Target(namespace="admin", version="1.3")  # the meshbus servers' second endpoint


def oslo_request(kind: str, method: str, *, prepare: dict[str, Any] | None = None, **args: Any) -> str:
    """A request for the oslo client peer: call, cast or fanout, with RPCClient.prepare() overrides."""
    return json.dumps({"kind": kind, "method": method, "args": args, "prepare": prepare or {}})


class Inbox:
    """What meshbus endpoints received, from any thread."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def put(self, **item: Any) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def expect(self, **fields: Any) -> dict[str, Any]:
        """The first item with these fields (and maybe others), waiting for it."""

        def found() -> dict[str, Any] | None:
            return next((item for item in self._items if fields.items() <= item.items()), None)

        with self._changed:
            item = self._changed.wait_for(found, WAIT)
            if item is None:
                raise AssertionError(f"nothing with {fields} within {WAIT} s; received: {self._items}")
            return item


# -- module-wide peers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start() -> Iterator[Start]:
    """Starts oslo 14 peers for the module; without network to make the virtualenv, the tests are skipped."""
    oslo14.require_python()
    with oslo14.peers() as start_peer:
        yield start_peer


@pytest.fixture(scope="module")
def oslo_servers(start: Start, _shared_router: Router) -> Iterator[dict[str, Peer]]:
    """oslo 14 RPC servers s1 and s2 of topic OSLO_SERVERS, once the router routes to both."""
    servers = {
        name: start(url(_shared_router), "server", "--topic", OSLO_SERVERS, "--server", name)
        for name in ("s1", "s2")
    }
    for server in servers.values():
        printed(server, ready=True)
    yield servers
    for server in servers.values():
        server.finish()


@pytest.fixture(scope="module")
def oslo_listener(start: Start, _shared_router: Router) -> Iterator[Peer]:
    """An oslo 14 notification listener of every priority of topic OSLO_NOTIFY."""
    listener = start(url(_shared_router), "listener", "--topic", OSLO_NOTIFY)
    printed(listener, ready=True)
    yield listener
    listener.finish()


@pytest.fixture(scope="module")
def transport(_shared_router: Router) -> Iterator[Transport]:
    """The meshbus side's blocking transport: the URL an oslo service uses works as it is."""
    with Transport(url(_shared_router)) as opened:
        yield opened


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio loop (the standard one: the blocking transport runs uvloop) in a thread of its own."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, name="test-asyncio", daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(WAIT)
    running.close()


def run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(WAIT * 2)


@pytest.fixture(scope="module")
def aio_transport(loop: asyncio.AbstractEventLoop, _shared_router: Router) -> Iterator[AsyncTransport]:
    async def connect() -> AsyncTransport:
        return AsyncTransport(url(_shared_router))

    opened = run(loop, connect())
    yield opened
    run(loop, opened.close())


class Endpoint:
    """A meshbus server's endpoint: records what it takes."""

    def __init__(self, server: str, inbox: Inbox) -> None:
        self.server = server
        self.inbox = inbox

    def echo(self, ctxt: dict[str, Any], value: Any) -> Any:
        self.inbox.put(server=self.server, method="echo", value=value, ctxt=ctxt)
        return value

    def fail(self, ctxt: dict[str, Any], message: str) -> None:
        raise ValueError(message)

    def record(self, ctxt: dict[str, Any], value: Any) -> None:
        self.inbox.put(server=self.server, method="record", value=value, ctxt=ctxt)

    def sleep(self, ctxt: dict[str, Any], seconds: float) -> str:
        time.sleep(seconds)
        return self.server


class AdminEndpoint:
    """The meshbus servers' endpoint of namespace "admin", version 1.3."""

    target = ADMIN

    async def echo(self, ctxt: dict[str, Any], value: Any) -> Any:
        return ["admin", value]


@pytest.fixture(scope="module")
def meshbus_servers(transport: Transport) -> Iterator[Inbox]:
    """meshbus RPC servers m1 and m2 of topic MESHBUS_SERVERS; what their endpoints took."""
    inbox = Inbox()
    servers = [
        RPCServer(
            transport, Target(topic=MESHBUS_SERVERS, server=name), [Endpoint(name, inbox), AdminEndpoint()]
        )
        for name in ("m1", "m2")
    ]
    for server in servers:
        server.start()
    yield inbox
    for server in servers:
        server.stop()
        server.wait()


class Notifications:
    """A meshbus listener's endpoint: records every notification, by priority."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def _took(
        self,
        priority: str,
        ctxt: dict[str, Any],
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        self.inbox.put(
            priority=priority,
            ctxt=ctxt,
            publisher_id=publisher_id,
            event_type=event_type,
            payload=payload,
            metadata=metadata,
        )

    audit = functools.partialmethod(_took, "audit")
    debug = functools.partialmethod(_took, "debug")
    info = functools.partialmethod(_took, "info")
    warn = functools.partialmethod(_took, "warn")
    error = functools.partialmethod(_took, "error")
    critical = functools.partialmethod(_took, "critical")
    sample = functools.partialmethod(_took, "sample")


@pytest.fixture(scope="module")
def meshbus_listener(transport: Transport) -> Iterator[Inbox]:
    """A meshbus notification listener of every priority of topic MESHBUS_NOTIFY; what it took."""
    inbox = Inbox()
    listener = NotificationListener(transport, [Target(topic=MESHBUS_NOTIFY)], [Notifications(inbox)])
    listener.start()
    yield inbox
    listener.stop()
    listener.wait()


# -- meshbus clients call oslo 14 servers --------------------------------------------------------------------


class LoopClient:
    """An `AsyncRPCClient` called from the test's thread: its coroutines run on the module's loop."""

    def __init__(self, aio: AsyncRPCClient, loop: asyncio.AbstractEventLoop) -> None:
        self.aio = aio
        self.loop = loop

    def prepare(self, **overrides: Any) -> LoopClient:
        return LoopClient(self.aio.prepare(**overrides), self.loop)

    def call(self, ctxt: Any, method: str, **kwargs: Any) -> Any:
        return run(self.loop, self.aio.call(ctxt, method, **kwargs))

    def cast(self, ctxt: Any, method: str, **kwargs: Any) -> None:
        run(self.loop, self.aio.cast(ctxt, method, **kwargs))


Client = RPCClient | LoopClient


@pytest.fixture(params=["blocking", "asyncio"])
def face(request: pytest.FixtureRequest) -> str:
    """Which client class a test uses: RPCClient, or AsyncRPCClient."""
    return str(request.param)


@pytest.fixture
def client(
    request: pytest.FixtureRequest,
    face: str,
    oslo_servers: dict[str, Peer],
    default_router: Router,
    transport: Transport,
) -> Client:
    """A meshbus RPC client of the oslo servers' topic, of the test's face."""
    target = Target(topic=OSLO_SERVERS)
    if face == "blocking":
        return RPCClient(transport, target, timeout=WAIT)
    loop: asyncio.AbstractEventLoop = request.getfixturevalue("loop")
    aio_transport: AsyncTransport = request.getfixturevalue("aio_transport")
    return LoopClient(AsyncRPCClient(aio_transport, target, timeout=WAIT), loop)


def printed_by_any(servers: dict[str, Peer], **fields: Any) -> tuple[str, dict[str, Any]]:
    """Which of the servers printed a line with these fields (and maybe others), and the line."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for name, server in servers.items():
            line = next((line for line in server.lines() if fields.items() <= line.items()), None)
            if line is not None:
                return name, line
        time.sleep(0.05)
    raise AssertionError(f"no server printed {fields}: {[server.describe() for server in servers.values()]}")


def test_a_virtual_host_is_the_namespace_of_the_oslo_drivers_pseudo_vhost(
    start: Start, _shared_router: Router
) -> None:
    """oslo 14's AMQP 1.0 driver puts a URL's virtual host into its addresses (pseudo_vhost, its default);
    meshbus does the same with the same URL, and without it reaches nothing of that virtual host."""
    tenant = url(_shared_router) + "tenant-a"
    server = start(tenant, "server", "--topic", "mb-vhost", "--server", "v1")
    try:
        printed(server, ready=True)
        with Transport(tenant) as transport:
            assert RPCClient(transport, Target(topic="mb-vhost"), timeout=WAIT).call({}, "echo", value=1) == 1
        with Transport(url(_shared_router)) as elsewhere, pytest.raises(MessageUndeliverable):
            RPCClient(elsewhere, Target(topic="mb-vhost"), timeout=WAIT).call({}, "echo", value=2)
    finally:
        server.finish()


def test_meshbus_call_returns_the_oslo_servers_value(
    client: Client, face: str, oslo_servers: dict[str, Peer]
) -> None:
    context = {"user": "alice", "request_id": f"req-{face}"}
    value = [face, 1, {"three": 3.5, "none": None}, "ünïcode"]
    assert client.call(context, "echo", value=value) == value
    assert client.call(context, "add", a=2, b=3) == 5
    _, line = printed_by_any(oslo_servers, method="echo", args={"value": value})
    assert line["ctxt"] == context


def test_an_oslo_servers_value_error_is_raised_at_the_meshbus_caller(client: Client, face: str) -> None:
    message = f"no such flavor ({face})"
    with pytest.raises(ValueError) as raised:
        client.call({}, "fail", message=message)
    # The message, then the remote traceback: the peer's method raised it.
    text = str(raised.value)
    assert text.split("\n", 1)[0] == message
    assert re.search(r"oslo14_peer\.py\", line \d+, in fail", text), text


def test_an_oslo_servers_dispatch_errors_reach_the_meshbus_caller_as_remote_errors(client: Client) -> None:
    # oslo_messaging.rpc.dispatcher is not among the caller's allowed modules: RemoteError, naming the class.
    for overrides, method, exc_type, value in [
        ({}, "missing", "NoSuchMethod", "Endpoint does not support RPC method missing"),
        (
            {"version": "2.0"},
            "echo",
            "UnsupportedVersion",
            "Endpoint does not support RPC version 2.0. Attempted method: echo",
        ),
        (
            {"namespace": "nowhere"},
            "echo",
            "UnsupportedVersion",
            "Endpoint does not support RPC version 1.0. Attempted method: echo",
        ),
    ]:
        with pytest.raises(RemoteError) as raised:
            client.prepare(**overrides).call({}, method, value=1)
        assert (raised.value.exc_type, raised.value.value) == (exc_type, value)
        assert str(raised.value) == f"remote error: {exc_type} {value}"


def test_a_meshbus_call_to_a_named_oslo_server_reaches_only_that_server(client: Client) -> None:
    # sleep(0) answers with the name of the server that ran it.
    for name in ("s1", "s2", "s2", "s1", "s2"):
        assert client.prepare(server=name).call({}, "sleep", seconds=0) == name


def test_meshbus_casts_and_fanout_casts_reach_the_oslo_servers(
    client: Client, face: str, oslo_servers: dict[str, Peer]
) -> None:
    context = {"user": "carol"}
    client.cast(context, "record", value=f"{face}-any")
    client.prepare(at_least_once=False).cast(context, "record", value=f"{face}-pre-settled")
    client.prepare(server="s1").cast(context, "record", value=f"{face}-to-s1")
    client.prepare(fanout=True).cast(context, "record", value=f"{face}-everyone")
    for server in oslo_servers.values():
        assert printed(server, method="record", args={"value": f"{face}-everyone"})["ctxt"] == context
    printed(oslo_servers["s1"], method="record", args={"value": f"{face}-to-s1"})
    for value in ("any", "pre-settled"):
        printed_by_any(oslo_servers, method="record", args={"value": f"{face}-{value}"})


def test_oslo_heartbeats_keep_a_monitored_meshbus_call_alive(
    transport: Transport, oslo_servers: dict[str, Peer], default_router: Router
) -> None:
    client = RPCClient(transport, Target(topic=OSLO_SERVERS, server="s2"), timeout=30)
    # An oslo server heartbeats every int(call_monitor_timeout) / 2 s, never more often than once a second:
    # with 1 s, none comes and the call fails after 1 s of silence...
    with pytest.raises(MessagingTimeout, match="call_monitor_timeout"):
        client.prepare(call_monitor_timeout=1).call({}, "sleep", seconds=2.5)
    # ...while with 2 s, the server's heartbeats (one a second) carry the call through its 3 s of work.
    assert client.prepare(call_monitor_timeout=2).call({}, "sleep", seconds=3) == "s2"


def test_meshbus_notifications_of_every_priority_reach_the_oslo_listener(
    transport: Transport, oslo_listener: Peer, default_router: Router
) -> None:
    notifier = Notifier(transport, "compute.meshbus", topics=[OSLO_NOTIFY], timeout=WAIT)
    context = {"project_id": "p1", "request_id": "req-7"}
    for n, priority in enumerate(PRIORITIES):
        getattr(notifier, priority)(context, f"meshbus.{priority}", {"n": n})
    for n, priority in enumerate(PRIORITIES):
        line = printed(oslo_listener, priority=priority, event_type=f"meshbus.{priority}")
        assert line["payload"] == {"n": n}
        assert line["publisher_id"] == "compute.meshbus"
        assert line["ctxt"] == context
        assert set(line["metadata"]) == {"message_id", "timestamp"}


# -- oslo 14 clients call meshbus servers --------------------------------------------------------------------


def oslo_client(start: Start, router: Router, *requests: str, context: Any = None) -> list[dict[str, Any]]:
    """Run the oslo client peer with these requests to the meshbus servers' topic; what it printed."""
    arguments = ["--topic", MESHBUS_SERVERS, "--timeout", str(WAIT), "--context", json.dumps(context or {})]
    return start(url(router), "client", *arguments, *requests).finish()


def test_oslo_calls_return_the_meshbus_servers_values(
    start: Start, meshbus_servers: Inbox, default_router: Router
) -> None:
    context = {"user": "dave", "request_id": "req-oslo"}
    value = ["from oslo", 1, {"x": [True, None]}]
    printed_lines = oslo_client(
        start,
        default_router,
        oslo_request("call", "echo", value=value),
        oslo_request("call", "echo", value="to m2", prepare={"server": "m2"}),
        oslo_request("call", "echo", value="admin", prepare={"namespace": "admin", "version": "1.2"}),
        context=context,
    )
    assert printed_lines == [{"result": value}, {"result": "to m2"}, {"result": ["admin", "admin"]}]
    assert meshbus_servers.expect(method="echo", value=value)["ctxt"] == context
    meshbus_servers.expect(server="m2", method="echo", value="to m2")


def test_errors_of_meshbus_servers_reach_the_oslo_caller(
    start: Start, meshbus_servers: Inbox, default_router: Router
) -> None:
    printed_lines = oslo_client(
        start,
        default_router,
        oslo_request("call", "fail", message="no such image"),
        oslo_request("call", "echo", value=1, prepare={"namespace": "nowhere"}),
        oslo_request("call", "echo", value=1, prepare={"version": "2.0"}),
        oslo_request("call", "echo", value=1, prepare={"namespace": "admin", "version": "1.4"}),
        oslo_request("call", "missing"),
    )
    # A builtin exception is rebuilt as itself; meshbus's dispatch errors come from a module oslo does not
    # allow, so they arrive as oslo's RemoteError naming the class and carrying the message.
    assert printed_lines[0] == {
        "error": {"class": "ValueError", "module": "builtins", "message": "no such image"}
    }
    remote = [line["error"] for line in printed_lines[1:]]
    assert {(error["class"], error["module"]) for error in remote} == {
        ("RemoteError", "oslo_messaging.rpc.client")
    }
    assert [error["message"] for error in remote] == [
        "Remote error: UnsupportedVersion endpoint does not support RPC version 1.0. Attempted method: echo",
        "Remote error: UnsupportedVersion endpoint does not support RPC version 2.0. Attempted method: echo",
        "Remote error: UnsupportedVersion endpoint does not support RPC version 1.4. Attempted method: echo",
        "Remote error: NoSuchMethod endpoint does not support RPC method missing",
    ]


def test_oslo_casts_and_fanout_casts_reach_the_meshbus_servers(
    start: Start, meshbus_servers: Inbox, default_router: Router
) -> None:
    context = {"user": "erin"}
    printed_lines = oslo_client(
        start,
        default_router,
        oslo_request("cast", "record", value="oslo-any"),
        oslo_request("cast", "record", value="oslo-to-m1", prepare={"server": "m1"}),
        oslo_request("fanout", "record", value="oslo-everyone"),
        context=context,
    )
    assert printed_lines == [{"result": None}] * 3
    assert meshbus_servers.expect(method="record", value="oslo-any")["ctxt"] == context
    meshbus_servers.expect(server="m1", method="record", value="oslo-to-m1")
    for name in ("m1", "m2"):
        meshbus_servers.expect(server=name, method="record", value="oslo-everyone")


def test_meshbus_heartbeats_keep_a_monitored_oslo_call_alive(
    start: Start, meshbus_servers: Inbox, default_router: Router
) -> None:
    # The oslo caller fails a call after 2 s without reply or heartbeat; the meshbus server works 3 s on it.
    assert oslo_client(
        start,
        default_router,
        oslo_request("call", "sleep", seconds=3, prepare={"server": "m1", "call_monitor_timeout": 2}),
    ) == [{"result": "m1"}]


@pytest.mark.parametrize("driver", ["messaging", "messagingv2"])
def test_oslo_notifications_of_every_priority_reach_the_meshbus_listener(
    start: Start, meshbus_listener: Inbox, default_router: Router, driver: str
) -> None:
    context = {"project_id": "p2", "request_id": f"req-{driver}"}
    notify_every_priority(start, default_router, MESHBUS_NOTIFY, "compute.oslo", driver, context)
    for n, priority in enumerate(PRIORITIES):
        note = meshbus_listener.expect(priority=priority, event_type=f"{driver}.{priority}")
        assert note["payload"] == {"n": n}
        assert note["publisher_id"] == "compute.oslo"
        assert context.items() <= note["ctxt"].items()  # a RequestContext's dict: more keys
        assert set(note["metadata"]) == {"message_id", "timestamp"}
        assert all(note["metadata"].values()), note
