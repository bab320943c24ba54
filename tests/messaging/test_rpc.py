"""RPC through a real router, in both faces (blocking and asyncio): calls, casts, fanout, named servers,
`prepare`, time-outs, namespace and version dispatch, exceptions raised at the caller, serializers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from meshbus.amqp.client import IncomingMessage, Receiver
from meshbus.messaging import (
    MessageDeliveryFailure,
    MessageUndeliverable,
    MessagingTimeout,
    NoSuchMethod,
    RemoteError,
    Serializer,
    Target,
    UnsupportedVersion,
    expected_exceptions,
    wire,
)
from tests.messaging.conftest import WAIT, Api, Inbox

MODULE = __name__


class QuotaExceeded(Exception):
    """An application's own exception type."""


class Service:
    """An endpoint with a method of each kind a service has; `name` tells which server answered."""

    def __init__(self, name: str = "server", inbox: Inbox | None = None) -> None:
        self.name = name
        self.inbox = inbox or Inbox()
        self.gate = threading.Event()

    def echo(self, ctxt: Any, value: Any) -> Any:
        return value

    def context(self, ctxt: Any) -> Any:
        return ctxt

    async def echo_later(self, ctxt: Any, value: Any) -> Any:
        await asyncio.sleep(0)
        return value

    def whoami(self, ctxt: Any) -> str:
        return self.name

    def record(self, ctxt: Any, n: int) -> None:
        self.inbox.put((self.name, n))

    def hold(self, ctxt: Any) -> str:
        """Returns once the test opens the gate."""
        self.gate.wait(WAIT)
        self.inbox.put((self.name, "held"))
        return "released"

    def fail(self, ctxt: Any, kind: str) -> None:
        if kind == "quota":
            raise QuotaExceeded("over 10 GiB")
        raise ValueError(f"bad {kind}")

    @expected_exceptions(ValueError)
    def check(self, ctxt: Any, size: int) -> None:
        raise ValueError(f"size {size} is too large")

    @expected_exceptions(ValueError)
    async def check_later(self, ctxt: Any, size: int) -> None:
        await asyncio.sleep(0)
        raise ValueError(f"size {size} is too large")

    def _private(self, ctxt: Any) -> str:
        return "leaked"


def serve(api: Api, topic: str, name: str = "server", **options: Any) -> Service:
    """A server named `name` of `topic` on a transport of its own; its endpoint."""
    endpoint = Service(name, options.pop("inbox", None))
    api.server(api.transport(), Target(topic=topic, server=name), [endpoint], **options)
    return endpoint


# -- calls and casts ----------------------------------------------------------------------------------------


VALUES = ["text", "héllo wörld", 7, 2.5, None, True, [1, "a", None], {"k": {"n": [1, 2]}}, ""]


def test_a_call_returns_the_endpoints_result(api: Api, topic: str) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    assert [client.call({}, "echo", value=value) for value in VALUES] == VALUES
    assert client.call({}, "echo_later", value=[1, 2]) == [1, 2], "a coroutine endpoint method"
    assert client.call({"user": "alice", "roles": ["admin"]}, "context") == {
        "user": "alice",
        "roles": ["admin"],
    }


def test_a_call_larger_than_a_frame_returns_whole(api: Api, topic: str) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    value = "".join(chr(0x41 + i % 26) for i in range(300_000))  # five frames of 64 KiB, both ways
    assert client.call({}, "echo", value=value) == value


def test_a_cast_runs_the_endpoint_and_returns_nothing(api: Api, topic: str) -> None:
    endpoint = serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    assert client.cast({}, "record", n=1) is None
    assert client.cast({}, "record", n=2) is None
    assert sorted(endpoint.inbox.wait_for(2)) == [("server", 1), ("server", 2)]


def test_a_fanout_cast_reaches_every_server_once(api: Api, topic: str) -> None:
    inbox = Inbox()
    for name in ("s1", "s2", "s3"):
        serve(api, topic, name, inbox=inbox)
    fanout = api.client(api.transport(), Target(topic=topic, fanout=True))
    for n in range(4):
        fanout.cast({}, "record", n=n)
    inbox.wait_for(12)
    time.sleep(0.2)  # room for copies that should not exist
    assert Counter(inbox.items) == {(name, n): 1 for name in ("s1", "s2", "s3") for n in range(4)}


def test_a_cast_to_the_topic_reaches_one_server(api: Api, topic: str) -> None:
    inbox = Inbox()
    for name in ("s1", "s2", "s3"):
        serve(api, topic, name, inbox=inbox)
    client = api.client(api.transport(), Target(topic=topic))
    for n in range(6):
        client.cast({}, "record", n=n)
    inbox.wait_for(6)
    time.sleep(0.2)  # room for copies that should not exist
    assert sorted(n for _, n in inbox.items) == list(range(6))


def test_a_call_to_a_named_server_reaches_only_it(api: Api, topic: str) -> None:
    for name in ("s1", "s2"):
        serve(api, topic, name)
    transport = api.transport()
    assert {api.client(transport, Target(topic=topic, server="s1")).call({}, "whoami") for _ in range(5)} == {
        "s1"
    }
    to_s2 = api.client(transport, Target(topic=topic)).prepare(server="s2")
    assert {to_s2.call({}, "whoami") for _ in range(5)} == {"s2"}
    anyone = api.client(transport, Target(topic=topic))
    assert {anyone.call({}, "whoami") for _ in range(6)} <= {"s1", "s2"}


def test_a_call_cannot_go_to_every_server(api: Api, topic: str) -> None:
    client = api.client(api.transport(), Target(topic=topic, fanout=True))
    with pytest.raises(ValueError, match="cast it instead"):
        client.call({}, "echo", value=1)


# -- prepare ------------------------------------------------------------------------------------------------


def test_prepare_changes_the_copy_and_leaves_the_client_alone(api: Api, topic: str) -> None:
    target = Target(topic=topic, version="1.0")
    client = api.client(api.transport(), target, timeout=30.0)
    prepared = client.prepare(
        exchange="nova", topic="other", namespace="admin", version="1.2", server="h1", timeout=0.5, retry=3
    )
    assert prepared.target == Target(
        exchange="nova", topic="other", namespace="admin", version="1.2", server="h1"
    )
    assert (prepared.aio.timeout, prepared.aio.retry) == (0.5, 3)
    assert client.target == target
    assert (client.aio.timeout, client.aio.retry) == (30.0, None)


def test_prepare_topic_and_exchange_choose_the_servers(api: Api, topic: str) -> None:
    serve(api, topic, "a")
    serve(api, topic + "-b", "b")
    nova = Service("nova")
    api.server(api.transport(), Target(exchange="nova", topic=topic, server="n"), [nova])
    client = api.client(api.transport(), Target(topic=topic), timeout=30.0)
    assert client.call({}, "whoami") == "a"
    assert client.prepare(topic=topic + "-b").call({}, "whoami") == "b"
    assert client.prepare(exchange="nova").call({}, "whoami") == "nova"


def test_a_call_times_out_when_the_server_is_slower(api: Api, topic: str) -> None:
    endpoint = serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic), timeout=30.0)
    started = time.monotonic()
    with pytest.raises(MessagingTimeout, match=r"no reply within 0\.3 s") as timed_out:
        client.prepare(timeout=0.3).call({}, "hold")
    assert time.monotonic() - started < 5.0
    assert isinstance(timed_out.value, TimeoutError)
    assert wire.rpc_address(Target(topic=topic)) in str(timed_out.value)
    endpoint.gate.set()
    assert endpoint.inbox.wait_for(1) == [("server", "held")]
    # The late reply to the call that timed out is dropped, not taken for another call's.
    assert client.call({}, "echo", value="next") == "next"


def test_retry_bounds_resends_of_a_message_its_consumer_failed(api: Api, topic: str) -> None:
    """A consumer that settles MODIFIED (delivery failed) makes the sender resend, `retry` times at most."""
    transport = api.transport()
    inbox = Inbox()

    def fail(message: IncomingMessage) -> None:
        body = wire.decode_request(message.payload).body
        inbox.put(body.get("method") or body.get("event_type"))
        message.modify(delivery_failed=True)

    async def subscribe() -> list[Receiver]:
        # (Notifications are stored: the store, not the notifier, redelivers those; tests/store.)
        receivers = [transport.aio.connection.receive(wire.rpc_address(Target(topic=topic)), fail)]
        await asyncio.gather(*(receiver.ready() for receiver in receivers))
        return receivers

    async def unsubscribe(receivers: list[Receiver]) -> None:
        for receiver in receivers:
            receiver.close()

    receivers = transport.run(subscribe())
    try:
        sender = api.transport()
        client = api.client(sender, Target(topic=topic), timeout=WAIT)
        with pytest.raises(MessageDeliveryFailure, match="delivery failed 3 times"):
            client.prepare(retry=2).cast({}, "cast_me")
        with pytest.raises(MessageDeliveryFailure, match="delivery failed 1 times"):
            client.prepare(retry=0).call({}, "call_me")
        assert inbox.items == ["cast_me"] * 3 + ["call_me"]
    finally:
        transport.run(unsubscribe(receivers))


# -- dispatch -----------------------------------------------------------------------------------------------


class ComputeV1:
    target = Target(version="1.3")

    def ping(self, ctxt: Any) -> str:
        return "v1.3"

    def _private(self, ctxt: Any) -> str:
        return "leaked"


class ComputeV2:
    target = Target(version="2.0")

    def ping(self, ctxt: Any) -> str:
        return "v2.0"


class Admin:
    target = Target(namespace="admin", version="1.1")

    def stats(self, ctxt: Any) -> str:
        return "admin stats"


DISPATCH = [
    # namespace, version, method: the result, or the exception the caller gets
    (None, None, "ping", "v1.3"),  # no version asks for 1.0, which 1.3 serves
    (None, "1.2", "ping", "v1.3"),
    (None, "1.3", "ping", "v1.3"),
    (None, "2.0", "ping", "v2.0"),
    (None, "1.4", "ping", UnsupportedVersion("1.4", "ping")),  # a newer minor than any endpoint's
    (None, "3.0", "ping", UnsupportedVersion("3.0", "ping")),  # an incompatible major
    ("admin", "1.0", "stats", "admin stats"),
    ("admin", "1.0", "ping", NoSuchMethod("ping")),  # another namespace's method
    ("other", None, "ping", UnsupportedVersion("1.0", "ping")),  # a namespace nobody serves
    (None, "1.0", "resize", NoSuchMethod("resize")),
    (None, "1.0", "_private", NoSuchMethod("_private")),  # private methods are never called
    (None, "1.0", "target", NoSuchMethod("target")),  # not a method
]


def test_namespace_and_version_choose_the_endpoint(api: Api, topic: str) -> None:
    api.server(api.transport(), Target(topic=topic, server="s"), [ComputeV1(), ComputeV2(), Admin()])
    client = api.client(api.transport(), Target(topic=topic))
    for namespace, version, method, expected in DISPATCH:
        prepared = client.prepare(namespace=namespace, version=version)
        case = f"{method} in namespace {namespace} at version {version}"
        if not isinstance(expected, Exception):
            assert prepared.call({}, method) == expected, case
            continue
        with pytest.raises(type(expected)) as raised:
            prepared.call({}, method)
        assert raised.value.args == expected.args, case
        assert str(raised.value).startswith(str(expected)), case


def test_a_version_cap_stops_newer_requests_at_the_client(api: Api, topic: str) -> None:
    client = api.client(api.transport(), Target(topic=topic), version_cap="1.2")
    assert client.can_send_version("1.2")
    assert not client.can_send_version("1.3")
    assert not client.can_send_version("2.0")
    with pytest.raises(UnsupportedVersion, match=r"version 1\.3"):
        client.prepare(version="1.3").call({}, "ping")
    with pytest.raises(UnsupportedVersion):
        client.prepare(version="1.3").cast({}, "ping")


# -- exceptions ---------------------------------------------------------------------------------------------


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "meshbus.messaging.rpc" and r.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize("method", ["check", "check_later"])
def test_an_expected_exception_reaches_the_caller_without_a_server_traceback(
    api: Api, topic: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    with pytest.raises(ValueError, match="size 5 is too large"):
        client.call({}, method, size=5)
    assert server_errors(caplog) == []


def test_a_remote_builtin_exception_is_raised_as_its_type(
    api: Api, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    with pytest.raises(ValueError, match="bad size") as raised:
        client.call({}, "fail", kind="size")
    assert "Traceback" in str(raised.value), "the remote traceback is missing"
    assert len(server_errors(caplog)) == 1, "an unexpected exception is logged by the server"


def test_an_exception_of_a_module_not_allowed_is_a_remote_error(api: Api, topic: str) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic))
    with pytest.raises(RemoteError) as raised:
        client.call({}, "fail", kind="quota")
    assert (raised.value.exc_type, raised.value.value) == ("QuotaExceeded", "over 10 GiB")
    assert "QuotaExceeded" in raised.value.traceback


def test_an_exception_of_an_allowed_module_is_rebuilt(api: Api, topic: str) -> None:
    serve(api, topic)
    client = api.client(api.transport(), Target(topic=topic), allowed_remote_modules=[MODULE])
    with pytest.raises(QuotaExceeded) as raised:
        client.call({}, "fail", kind="quota")
    assert str(raised.value).startswith("over 10 GiB\n")
    assert type(raised.value).__name__ == "QuotaExceeded_Remote"


# -- serializers --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Money:
    cents: int
    currency: str


@dataclass(frozen=True)
class RequestContext:
    user: str


class MoneySerializer(Serializer):
    """Money travels as {"money": [cents, currency]}; contexts are RequestContext objects."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        assert isinstance(ctxt, RequestContext), f"the entity's context is {ctxt!r}"
        return {"money": [entity.cents, entity.currency]} if isinstance(entity, Money) else entity

    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
        assert isinstance(ctxt, RequestContext), f"the entity's context is {ctxt!r}"
        return Money(*entity["money"]) if isinstance(entity, dict) and "money" in entity else entity

    def serialize_context(self, ctxt: Any) -> dict[str, Any]:
        return {"user": ctxt.user}

    def deserialize_context(self, ctxt: dict[str, Any]) -> Any:
        return RequestContext(ctxt["user"])


class Bank:
    def __init__(self) -> None:
        self.seen = Inbox()

    def double(self, ctxt: Any, amount: Any) -> Any:
        self.seen.put((ctxt, amount))
        return Money(amount.cents * 2, amount.currency)


def test_a_serializer_carries_entities_and_context_both_ways(api: Api, topic: str) -> None:
    bank = Bank()
    api.server(api.transport(), Target(topic=topic, server="s"), [bank], serializer=MoneySerializer())
    client = api.client(api.transport(), Target(topic=topic), serializer=MoneySerializer())
    assert client.call(RequestContext("alice"), "double", amount=Money(250, "EUR")) == Money(500, "EUR")
    assert bank.seen.items == [(RequestContext("alice"), Money(250, "EUR"))]
    client.cast(RequestContext("bob"), "double", amount=Money(1, "USD"))
    assert bank.seen.wait_for(2)[1] == (RequestContext("bob"), Money(1, "USD"))


def test_nobody_serving_a_named_server_fails_at_once(api: Api, topic: str) -> None:
    serve(api, topic, "s1")
    client = api.client(api.transport(), Target(topic=topic, server="s2"), timeout=30.0)
    with pytest.raises(MessageUndeliverable) as undeliverable:
        client.call({}, "whoami")
    assert undeliverable.value.address == wire.rpc_address(Target(topic=topic, server="s2"))


def test_a_virtual_host_is_a_namespace_of_its_own(api: Api, topic: str) -> None:
    tenant_a = api.url + "tenant-a"
    api.server(api.transport(tenant_a), Target(topic=topic, server="s"), [Service("in tenant-a")])
    assert api.client(api.transport(tenant_a), Target(topic=topic)).call({}, "echo", value=1) == 1
    for elsewhere in (api.url, api.url + "tenant-b"):
        client = api.client(api.transport(elsewhere), Target(topic=topic), timeout=30.0)
        with pytest.raises(MessageUndeliverable):
            client.call({}, "echo", value=2)
