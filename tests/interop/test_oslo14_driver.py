"""oslo.messaging 14.9.1's AMQP 1.0 driver talking to itself through a meshbus router.

Both ends are tests/oslo14_peer.py in the oslo 14.9.1 virtualenv (tests/oslo14.py): these tests pin down what
the router must do for that driver (pyngus, a session per link, routable addresses) before meshbus.messaging
meets the same peers. Each test uses topics of its own on the session's shared router.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests import cached, oslo14
from tests.conftest import Router
from tests.oslo14 import PRIORITIES, Peer, Start, notify_every_priority, printed, url

# The first test may make the virtualenv: pip on a cold cache takes a minute or more.
pytestmark = pytest.mark.timeout(cached.INSTALL_TIMEOUT + 60)


@pytest.fixture
def start() -> Iterator[Start]:
    oslo14.require_python()
    with oslo14.peers() as start_peer:
        yield start_peer


def serve(start: Start, router: Router, topic: str, *names: str) -> list[Peer]:
    """RPC servers on `topic`, one per name, once the router routes to them all."""
    servers = [start(url(router), "server", "--topic", topic, "--server", name) for name in names]
    for server in servers:
        printed(server, ready=True)
    return servers


def request(kind: str, method: str, **args: Any) -> str:
    return json.dumps({"kind": kind, "method": method, "args": args})


def test_call_returns_the_value(start: Start, default_router: Router) -> None:
    (server,) = serve(start, default_router, "oslo14-call", "s1")
    context = {"user": "alice", "request_id": "req-1"}
    value = [1, "two", {"three": 3.0}, None]
    client = start(
        url(default_router),
        "client",
        "--topic",
        "oslo14-call",
        "--context",
        json.dumps(context),
        request("call", "echo", value=value),
        request("call", "add", a=2, b=3),
    )
    assert client.finish() == [{"result": value}, {"result": 5}]
    assert printed(server, method="echo", args={"value": value})["ctxt"] == context
    server.finish()


def test_remote_value_error_is_raised_at_the_caller(start: Start, default_router: Router) -> None:
    (server,) = serve(start, default_router, "oslo14-fail", "s1")
    client = start(
        url(default_router),
        "client",
        "--topic",
        "oslo14-fail",
        request("call", "fail", message="no such flavor"),
    )
    # A builtin exception comes back as itself (not a *_Remote subclass), its text followed by the traceback.
    assert client.finish() == [
        {"error": {"class": "ValueError", "module": "builtins", "message": "no such flavor"}}
    ]
    server.finish()


def test_casts_reach_the_server(start: Start, default_router: Router) -> None:
    (server,) = serve(start, default_router, "oslo14-cast", "s1")
    context = {"user": "carol"}
    casts = [request("cast", "record", value=n) for n in range(3)]
    client = start(
        url(default_router), "client", "--topic", "oslo14-cast", "--context", json.dumps(context), *casts
    )
    assert client.finish() == [{"result": None}] * 3
    for n in range(3):
        assert printed(server, method="record", args={"value": n})["ctxt"] == context
    directed = start(
        url(default_router),
        "client",
        "--topic",
        "oslo14-cast",
        "--server",
        "s1",
        request("cast", "record", value="direct"),
    )
    directed.finish()
    printed(server, method="record", args={"value": "direct"})
    server.finish()


def test_fanout_reaches_every_server_and_a_directed_cast_only_its_own(
    start: Start, default_router: Router
) -> None:
    first, second = serve(start, default_router, "oslo14-fanout", "s1", "s2")
    client = start(
        url(default_router),
        "client",
        "--topic",
        "oslo14-fanout",
        "--server",
        "s2",
        request("cast", "record", value="direct"),
        request("fanout", "record", value="everyone"),
    )
    client.finish()
    printed(first, method="record", args={"value": "everyone"})
    printed(second, method="record", args={"value": "everyone"})
    printed(second, method="record", args={"value": "direct"})
    # The directed cast went out before the fanout one, which s1 took before it stopped: had the router sent
    # the directed one to s1 too, s1 would have printed it.
    assert not any(line.get("args") == {"value": "direct"} for line in first.finish())
    second.finish()


@pytest.mark.parametrize("driver", ["messaging", "messagingv2"])
def test_notifications_of_every_priority_reach_the_listener(
    start: Start, default_router: Router, driver: str
) -> None:
    topic = f"oslo14-notify-{driver}"
    listener = start(url(default_router), "listener", "--topic", topic)
    printed(listener, ready=True)
    context = {"project_id": "p1", "request_id": "req-9"}
    notify_every_priority(start, default_router, topic, "compute.host1", driver, context)
    for n, priority in enumerate(PRIORITIES):
        line = printed(listener, priority=priority, event_type=f"{driver}.{priority}", payload={"n": n})
        assert line["publisher_id"] == "compute.host1"
        assert context.items() <= line["ctxt"].items()
        assert set(line["metadata"]) == {"message_id", "timestamp"}
    listener.finish()
