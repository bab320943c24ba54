"""How the library uses its connection, through a real router: many calls on one connection and one reply
link, fast failure when nobody serves an address, at-least-once and fire-and-forget casts, acknowledgement,
and a receiver the router refuses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshbus.amqp.client import IncomingMessage
from meshbus.messaging import (
    AsyncRPCClient,
    ClientError,
    LinkRefused,
    MessageDeliveryFailure,
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
    Target,
    wire,
)
from meshbus.messaging.transport import _Waiter
from tests.conftest import Config, Router
from tests.messaging.conftest import WAIT, Api, AsyncioApi, BlockingApi, url_of
from tests.messaging.peers import free_port
from tests.messaging.test_rpc import Service, serve

FAST = 5.0  # seconds: a generous bound for "at once", far below the 30 s time-out the clients are given


class Gathering:
    """Holds each call until `size` calls are in progress at once: only pipelined calls get through."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_progress = 0
        self.full: asyncio.Event | None = None

    async def square(self, ctxt: Any, n: int) -> int:
        if self.full is None:
            self.full = asyncio.Event()
        self.in_progress += 1
        if self.in_progress >= self.size:
            self.full.set()
        await asyncio.wait_for(self.full.wait(), WAIT)
        return n * n


def test_100_concurrent_asyncio_calls_share_one_connection_and_one_reply_link(
    aio: AsyncioApi, topic: str
) -> None:
    aio.server(aio.transport(), Target(topic=topic, server="s"), [Gathering(size=20)])
    transport = aio.transport()

    async def call_100() -> list[Any]:
        client = AsyncRPCClient(transport.aio, Target(topic=topic))
        return list(await asyncio.gather(*(client.call({}, "square", n=n) for n in range(100))))

    assert aio.run(call_100()) == [n * n for n in range(100)]
    connection = transport.aio.connection
    assert len(connection._receivers) == 1, "the client's only receiver is its reply link"
    assert list(connection._senders) == [wire.rpc_address(Target(topic=topic))]


def test_a_cancelled_asyncio_call_is_forgotten_and_its_late_reply_dropped(
    aio: AsyncioApi, topic: str
) -> None:
    service = serve(aio, topic)
    transport = aio.transport()

    async def give_up_then_call() -> Any:
        client = AsyncRPCClient(transport.aio, Target(topic=topic), timeout=WAIT)
        held = asyncio.get_running_loop().create_task(client.call({}, "hold"))
        await asyncio.sleep(0.2)  # the server took it and holds it
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert transport.aio._calls == {}, "a call given up is forgotten at once"
        service.gate.set()  # its reply now comes back to nobody
        service.inbox.wait_for(1)
        return await client.call({}, "echo", value="after")

    assert aio.run(give_up_then_call()) == "after"


def test_16_threads_call_through_one_blocking_transport(blocking: BlockingApi, topic: str) -> None:
    serve(blocking, topic)
    transport = blocking.transport()
    client = blocking.client(transport, Target(topic=topic))

    def calls(thread: int) -> list[Any]:
        return [client.call({}, "echo", value=[thread, n]) for n in range(25)]

    with concurrent.futures.ThreadPoolExecutor(16) as threads:
        results = list(threads.map(calls, range(16)))
    assert results == [[[thread, n] for n in range(25)] for thread in range(16)]
    assert len(transport.aio.connection._receivers) == 1, "the client's only receiver is its reply link"


def test_the_librarys_own_threads_wait_their_turn_when_woken(blocking: BlockingApi, topic: str) -> None:
    serve(blocking, topic)
    transport = blocking.transport()
    assert blocking.client(transport, Target(topic=topic)).call({}, "echo", value=1) == 1
    own = [t for t in threading.enumerate() if t.name.startswith(("meshbus-io", "meshbus-rpc"))]
    assert {t.name.partition("_")[0] for t in own} == {"meshbus-io", "meshbus-rpc"}
    for thread in own:
        assert thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == os.SCHED_BATCH, thread.name
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller's thread is the application's"


def test_a_forked_child_waits_on_wake_ups_of_its_own(blocking: BlockingApi, topic: str) -> None:
    """Services fork workers: a child sharing its parent's eventfd could read a wake meant for the parent."""
    serve(blocking, topic)
    client = blocking.client(blocking.transport(), Target(topic=topic))
    assert client.call({}, "echo", value=1) == 1  # this thread has its wake-up now
    parents = _Waiter[Any]()._wakeup
    assert _Waiter[Any]()._wakeup is parents, "one wake-up per thread"
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, and leave at once
        os.write(writable, b"own" if _Waiter[Any]()._wakeup is not parents else b"shared")
        os._exit(0)
    os.close(writable)
    try:
        assert os.read(readable, 16) == b"own"
    finally:
        os.close(readable)
        os.waitpid(pid, 0)


def test_a_closed_blocking_transport_says_so(blocking: BlockingApi, topic: str) -> None:
    serve(blocking, topic)
    transport = blocking.transport()
    client = blocking.client(transport, Target(topic=topic))
    assert client.call({}, "echo", value=1) == 1
    transport.close()
    with pytest.raises(MessagingError, match="the transport is closed"):
        client.call({}, "echo", value=2)


class Slow:
    def echo(self, ctxt: Any, value: Any) -> Any:
        time.sleep(0.005)
        return value


def call_until_closed(client: Any, errors: queue.SimpleQueue[BaseException]) -> None:
    while True:
        try:
            client.call({}, "echo", value=1)
        except (MessagingError, ClientError) as error:  # (OutcomeUnknown: the server had taken the call)
            errors.put(error)
            return


def test_closing_a_transport_ends_every_call_of_the_threads_using_it(
    blocking: BlockingApi, topic: str
) -> None:
    blocking.server(blocking.transport(), Target(topic=topic, server="s"), [Slow()])
    for _ in range(5):  # each close meets calls at another stage: queued, sent, taken
        transport = blocking.transport()
        client = blocking.client(transport, Target(topic=topic), timeout=WAIT)
        errors: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        threads = [threading.Thread(target=call_until_closed, args=(client, errors)) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        transport.close()
        for thread in threads:
            thread.join(WAIT)
        assert not [thread for thread in threads if thread.is_alive()], "calls still waiting after close"
        for _ in threads:
            error = errors.get_nowait()
            assert re.search(
                r"the transport (was|is) closed|the connection dropped \(closed by the app", str(error)
            )


def test_a_reply_given_back_is_resent_until_its_caller_is_there(blocking: BlockingApi, topic: str) -> None:
    address = f"test/replies/{topic}"
    server, caller = blocking.transport(), blocking.transport()
    replies: queue.Queue[bytes] = queue.Queue()

    async def reply() -> None:
        server.aio.reply(wire.encode_reply(address, "call-1", result=42))

    def take(message: IncomingMessage) -> None:
        message.accept()
        replies.put(message.payload)

    async def listen() -> None:
        await caller.aio.connection.receive(address, take).ready()

    server.run(reply())
    time.sleep(0.05)  # the router gives the reply back meanwhile: nobody receives from its address yet
    caller.run(listen())
    assert wire.decode_reply(replies.get(timeout=WAIT)) == ("call-1", {"response": 42})


def test_a_sender_link_idle_longer_than_its_time_out_is_closed(blocking: BlockingApi, topic: str) -> None:
    serve(blocking, topic)
    # Idle senders are swept on the connection's timer, at proton's next deadline (within idle_timeout).
    transport = blocking.transport(blocking.url + "?sender_idle_timeout=0.1&idle_timeout=2")
    client = blocking.client(transport, Target(topic=topic))
    assert client.call({}, "echo", value=1) == 1
    connection = transport.aio.connection
    assert list(connection._senders) == [wire.rpc_address(Target(topic=topic))]
    deadline = time.monotonic() + WAIT
    while connection._senders and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not connection._senders, "the idle sender link was not closed"
    assert client.call({}, "echo", value=2) == 2, "no new link after the idle one closed"


# -- fast failure --------------------------------------------------------------------------------------------


def fails_at_once(action: Callable[[], object], address: str) -> None:
    started = time.monotonic()
    with pytest.raises(MessageUndeliverable) as undeliverable:
        action()
    assert time.monotonic() - started < FAST, "nobody serving the address was noticed only at the time-out"
    assert undeliverable.value.address == address
    assert f"nobody serves {address}" in str(undeliverable.value)


def test_a_call_cast_or_notification_nobody_serves_fails_at_once(api: Api, topic: str) -> None:
    transport = api.transport()
    client = api.client(transport, Target(topic=topic), timeout=30.0)
    fails_at_once(lambda: client.call({}, "echo", value=1), wire.rpc_address(Target(topic=topic)))
    fails_at_once(lambda: client.cast({}, "echo", value=1), wire.rpc_address(Target(topic=topic)))
    fanout = client.prepare(fanout=True)
    fails_at_once(
        lambda: fanout.cast({}, "echo", value=1), wire.rpc_address(Target(topic=topic, fanout=True))
    )
    # A notification is stored for the listeners to come (notification addresses are queues, issue 6).
    notifier = api.notifier(transport, "test", topics=[topic], timeout=30.0)
    notifier.info({}, "nobody.listens.yet", {})
    notifier.flush()


def test_a_request_with_a_retry_budget_fails_once_that_many_connection_attempts_failed(
    api: Api, topic: str
) -> None:
    port = free_port()  # nothing listens there
    transport = api.transport(f"meshbus://127.0.0.1:{port}/")
    client = api.client(transport, Target(topic=topic), timeout=30.0, retry=0)
    not_reached = rf"not connected to a router \(.*\): is one running at 127\.0\.0\.1:{port}\?"
    started = time.monotonic()
    # The first waits for the connection's first attempt; the next find it failed: no wait at all.
    for send in (client.call, client.cast, client.call):
        with pytest.raises(
            MessageDeliveryFailure, match=not_reached + r" Given up after 1 failed attempt \(retry=0\)\."
        ):
            send({}, "echo", value=1)
    with pytest.raises(MessageDeliveryFailure, match=r"Given up after 3 failed attempts \(retry=2\)\."):
        client.prepare(retry=2).call({}, "echo", value=1)
    notifier = api.notifier(transport, "test", topics=[topic], retry=0)
    notifier.info({}, "nobody.hears.it", {})
    with pytest.raises(MessageDeliveryFailure, match=not_reached):
        notifier.flush()
    # Back-offs of 0.05 s doubling, against the time-out of 30 s the budget replaces.
    assert time.monotonic() - started < FAST


def test_calls_go_to_the_servers_still_serving_while_another_stops(api: Api, topic: str) -> None:
    stopping = api.server(api.transport(), Target(topic=topic, server="a"), [Service("a")])
    serve(api, topic, "b")
    client = api.client(api.transport(), Target(topic=topic), timeout=WAIT)
    assert {client.call({}, "whoami") for _ in range(8)} == {"a", "b"}

    stopping.stop()  # not waited for: its links stay attached, their credit drained

    assert [client.call({}, "whoami") for _ in range(4)] == ["b"] * 4


def test_a_call_fails_at_once_after_its_server_stopped(api: Api, topic: str) -> None:
    transport = api.transport()
    server = api.server(transport, Target(topic=topic, server="s"), [Service()])
    client = api.client(api.transport(), Target(topic=topic), timeout=30.0)
    assert client.call({}, "echo", value=1) == 1
    server.stop()
    server.wait()
    fails_at_once(lambda: client.call({}, "echo", value=2), wire.rpc_address(Target(topic=topic)))


# -- acknowledgement -----------------------------------------------------------------------------------------


def test_fire_and_forget_returns_without_an_outcome_and_still_arrives(api: Api, topic: str) -> None:
    client = api.client(api.transport(), Target(topic=topic), at_least_once=False, timeout=30.0)
    client.cast({}, "record", n=0)  # nobody serves it: dropped, and nobody is told
    endpoint = serve(api, topic)
    client.cast({}, "record", n=1)
    assert endpoint.inbox.wait_for(1) == [("server", 1)]


def test_an_at_least_once_cast_returns_once_a_server_took_it(api: Api, topic: str) -> None:
    """A server takes at most `max_in_progress` requests per address: with its one request in progress, it
    takes no other, so a fire-and-forget cast returns at once while an at-least-once cast waits."""
    endpoint = serve(api, topic, max_in_progress=1)
    client = api.client(api.transport(), Target(topic=topic), timeout=30.0)
    client.cast({}, "hold")  # taken: it returns while the endpoint holds it
    client.prepare(at_least_once=False).cast({}, "hold")
    with pytest.raises(MessagingTimeout, match=r"not taken within 0\.5 s"):
        client.prepare(timeout=0.5).cast({}, "hold")
    assert endpoint.inbox.items == []
    endpoint.gate.set()
    # The router kept what the server could not take yet: all three arrive.
    assert endpoint.inbox.wait_for(3) == [("server", "held")] * 3


LIMITED: Config = {"listener": [{"max_message_size": 1 << 20}]}


def test_a_message_the_router_refuses_as_too_large_never_reaches_the_server_nor_takes_its_credit(
    router: Callable[[Config], Router], api: Api, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The router streams a large message to its consumer as it arrives, and aborts that copy once the
    # message passes the limit: the server must drop the aborted copy and give its credit back.
    url = url_of(router(LIMITED))
    api.server(api.transport(url), Target(topic=topic, server="s"), [Service("s")], max_in_progress=1)
    client = api.client(api.transport(url), Target(topic=topic), timeout=FAST)
    with pytest.raises(MessageDeliveryFailure, match=r"message-size-exceeded: message larger than"):
        client.call({}, "echo", value="x" * (2 << 20))
    assert [client.call({}, "echo", value=n) for n in range(3)] == [0, 1, 2]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class Grower:
    def grow(self, ctxt: Any, size: int) -> str:
        return "x" * size


def test_a_reply_the_router_refuses_as_too_large_fails_its_call_at_once_saying_why(
    router: Callable[[Config], Router], api: Api, topic: str
) -> None:
    url = url_of(router(LIMITED))
    api.server(api.transport(url), Target(topic=topic, server="s"), [Grower()])
    client = api.client(api.transport(url), Target(topic=topic), timeout=30.0)
    started = time.monotonic()
    with pytest.raises(
        MessageDeliveryFailure,
        match=r"the router refused the server's reply: it was rejected \(amqp:link:message-size-exceeded",
    ):
        client.call({}, "grow", size=2 << 20)
    assert time.monotonic() - started < FAST
    assert client.call({}, "grow", size=3) == "xxx"


# -- refusal -------------------------------------------------------------------------------------------------


class InfoOnly:
    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        pass


REFUSED: Config = {
    "address": [
        {"prefix": "openstack.org/om/rpc/anycast/openstack/refused", "distribution": "unavailable"},
        {"prefix": "openstack.org/om/notify/anycast/openstack/refused", "distribution": "unavailable"},
    ]
}


def test_a_receiver_the_router_refuses_fails_the_start(router: Callable[[Config], Router], api: Api) -> None:
    transport = api.transport(url_of(router(REFUSED)))
    anycast = wire.rpc_address(Target(topic="refused"))
    with pytest.raises(
        LinkRefused, match=re.escape(f"refused the receiver for {anycast}: amqp:not-found")
    ) as refused:
        api.server(transport, Target(topic="refused", server="s"), [Service()])
    assert "configured unavailable" in str(refused.value)
    # Its own address was not refused, but a server that failed to start serves nothing.
    fails_at_once(
        lambda: api.client(transport, Target(topic="refused", server="s"), timeout=30.0).call({}, "whoami"),
        wire.rpc_address(Target(topic="refused", server="s")),
    )
    with pytest.raises(
        LinkRefused,
        match=re.escape("refused the receiver for openstack.org/om/notify/anycast/openstack/refused"),
    ):
        api.listener(transport, [Target(topic="refused")], [InfoOnly()])
    # The connection is still good for the addresses the router serves.
    api.server(transport, Target(topic="served", server="s"), [Service()])
    assert api.client(transport, Target(topic="served")).call({}, "echo", value="ok") == "ok"
