"""Connections: heartbeats, SASL, many peers at once, and bad input that must not hurt other peers."""

from __future__ import annotations

import random
import re
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Condition, Event, Message
from proton._io import IO

import meshbus
from tests.conftest import Config, Router
from tests.integration.clients import (
    Client,
    Exchange,
    PollSelector,
    RawPeer,
    Running,
    numbered,
    run,
    the,
    unique,
)

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
MiB = 1 << 20
DESCRIPTORS = 4096  # a thousand connections, and room to spare


RawPeers = Callable[..., RawPeer]


@pytest.fixture
def raw_peer() -> Iterator[RawPeers]:
    """Connect a RawPeer to a router: `raw_peer(router, receive_buffer=...)`; closed after the test."""
    peers: list[RawPeer] = []

    def connect(router: Router, **options: Any) -> RawPeer:
        since = router.mark()
        peers.append(RawPeer(router.host, router.port, **options))
        peers[-1].log_since = since
        return peers[-1]

    yield connect
    for peer in peers:
        peer.close()


def closed_line(router: Router, peer: RawPeer, timeout: float = 5.0) -> str:
    """The router's log line saying why it closed this peer's connection."""
    port = peer.socket.getsockname()[1]
    found = router.wait_for_log(rf"connection closed: peer=127\.0\.0\.1:{port} .*", timeout, peer.log_since)
    assert found is not None, f"no 'connection closed' line for the peer on port {port}"
    return found.group(0)


def test_heartbeat_timeout_drops_a_silent_peer_and_its_links(
    router: Callable[[Config], Router], raw_peer: RawPeers
) -> None:
    heartbeat = router({"listener": [{"idle_timeout": 1.0}]})
    address = unique("test/silent")
    peer = raw_peer(heartbeat)
    peer.subscribe(address, credit=10)
    peer.open()  # header, open, begin, attach, flow; then not a byte more
    started = time.monotonic()
    assert peer.read_until_closed(timeout=10), "the router did not close a connection silent for 10 s"
    print(f"silent peer closed after {time.monotonic() - started:.2f} s")
    peer.decode()
    assert peer.transport.remote_idle_timeout > 0, "the router advertised no idle time-out"
    condition = peer.connection.remote_condition
    assert condition is not None, "the router closed the socket without a Close frame carrying an error"
    assert condition.name == "amqp:resource-limit-exceeded"
    assert "resource-limit-exceeded" in closed_line(heartbeat, peer)
    # Its consumer went with it: a message to its address finds nobody.
    exchange = run(Exchange(heartbeat.url, address, numbered("late", 1), [], anonymous=True))
    assert [o.name for o in exchange.settled_outcomes()] == ["released"]


class Quiet(Client):
    """One connection that asks the router for heartbeats (idle time-out 1 s) and then says nothing."""

    QUIET = 3.0  # seconds

    def begin(self) -> None:
        self.connect(heartbeat=1.0)

    def on_connection_opened(self, event: Event) -> None:
        self.later(self.QUIET, self.done)


def test_the_router_sends_heartbeats_to_a_peer_that_asks(default_router: Router) -> None:
    # Without empty frames from the router the client's transport fails with resource-limit-exceeded.
    run(Quiet(default_router.url))


class Login(Client):
    """Open one connection with these SASL settings; record whether it opened or why it failed."""

    def __init__(self, url: str, **settings: Any) -> None:
        super().__init__(url)
        self.settings = settings
        self.opened = False
        self.failed = False
        self.error: Condition | None = None
        self.properties: dict[Any, Any] = {}  # of the router's Open frame
        self.capabilities: list[Any] = []

    def begin(self) -> None:
        self.connect(**self.settings)

    def on_connection_opened(self, event: Event) -> None:
        self.opened = True
        connection = the(event.connection)
        self.properties = dict(connection.remote_properties or {})
        self.capabilities = list(connection.remote_offered_capabilities or [])
        self.done()

    def on_transport_error(self, event: Event) -> None:
        self.failed = True
        self.error = the(event.transport).condition
        self.done()


@pytest.fixture
def secured(router: Callable[[Config], Router], tmp_path: Path) -> Router:
    """A router whose listener requires PLAIN, with a users file made by `meshbus users add`."""
    users = tmp_path / "users.txt"
    subprocess.run(
        [sys.executable, "-m", "meshbus", "users", "add", str(users), "alice"],
        input="wonder land\n",
        text=True,
        check=True,
        timeout=30,
    )
    return router({"router": {"users_file": users.name}, "listener": [{"authenticate_peer": True}]})


def test_plain_with_the_right_password_connects(secured: Router) -> None:
    login = run(Login(secured.url, user="alice", password="wonder land", allowed_mechs="PLAIN"))
    assert login.opened, f"the connection failed: {login.error}"
    assert secured.wait_for_log(r"connection opened: .* user=alice", 5) is not None


@pytest.mark.parametrize(
    "settings",
    [
        {"user": "alice", "password": "wonderland", "allowed_mechs": "PLAIN"},
        {"user": "mallory", "password": "wonder land", "allowed_mechs": "PLAIN"},
    ],
    ids=["wrong-password", "unknown-user"],
)
def test_plain_with_wrong_credentials_gets_a_sasl_outcome_auth(
    secured: Router, settings: dict[str, str]
) -> None:
    login = run(Login(secured.url, **settings))
    assert not login.opened
    # proton reports a sasl-outcome `auth` as unauthorized-access; a dropped socket as a framing error.
    assert login.error is not None and login.error.name == "amqp:unauthorized-access", login.error


def test_anonymous_is_refused_where_authentication_is_required(secured: Router) -> None:
    login = run(Login(secured.url, allowed_mechs="ANONYMOUS"))
    assert not login.opened, "an ANONYMOUS connection opened on a listener with authenticate_peer = true"
    assert login.error is not None and login.error.name == "amqp:unauthorized-access", login.error


def test_a_peer_skipping_sasl_is_refused_where_authentication_is_required(secured: Router) -> None:
    login = run(Login(secured.url, sasl_enabled=False))
    assert not login.opened
    assert login.failed


def test_the_open_frame_names_the_product_and_offers_anonymous_relay(default_router: Router) -> None:
    login = run(Login(default_router.url))
    assert login.opened, f"the connection failed: {login.error}"
    assert login.properties.get("product") == "meshbus"
    assert login.properties.get("version") == meshbus.__version__
    assert "ANONYMOUS-RELAY" in login.capabilities


class ManyConnections(Client):
    """`count` connections with a consumer each; then a producer sends one message to a few of them."""

    timeout = 60.0

    def __init__(self, url: str, count: int, probes: list[int]) -> None:
        super().__init__(url)
        self.count = count
        self.probes = probes
        self.base = unique("test/many")
        self.attached = 0
        self.received: dict[int, object] = {}
        self.accepted = 0
        self.sent = False

    def begin(self) -> None:
        for n in range(self.count):
            self.container.create_receiver(self.connect(), f"{self.base}/{n}", name=f"consumer-{n}")

    def on_link_opened(self, event: Event) -> None:
        if the(event.link).is_receiver:
            self.attached += 1
            if self.attached == self.count:
                self.sender = self.container.create_sender(self.connect(), None, name="producer")

    def on_sendable(self, event: Event) -> None:
        if not self.sent:
            self.sent = True
            for n in self.probes:
                the(event.sender).send(Message(address=f"{self.base}/{n}", body=n))

    def on_message(self, event: Event) -> None:
        consumer = int(the(event.receiver).name.removeprefix("consumer-"))
        self.received[consumer] = the(event.message).body

    def on_accepted(self, event: Event) -> None:
        self.accepted += 1
        if self.accepted == len(self.probes):
            self.done()


@pytest.fixture
def many_descriptors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Room for over a thousand sockets in this process, and a proton Container that can watch them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < DESCRIPTORS:
        if hard != resource.RLIM_INFINITY and hard < DESCRIPTORS:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {DESCRIPTORS}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, hard))
    monkeypatch.setattr(IO, "Selector", PollSelector)
    yield
    PollSelector.close_all()  # after a failure, so that later tests do not inherit a thousand sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_concurrent_connections(
    router: Callable[[Config], Router], many_descriptors: None
) -> None:
    busy = router({})
    started = time.monotonic()
    client = run(ManyConnections(busy.url, 1000, probes=[0, 499, 999]))
    print(f"1,000 connections opened, used and closed in {time.monotonic() - started:.1f} s")
    assert client.received == {0: 0, 499: 499, 999: 999}
    exchange = run(Exchange(busy.url, unique("test/after-many"), numbered("still", 3)))
    assert exchange.bodies(0) == ["still-0", "still-1", "still-2"]


class SteadyTraffic(Client):
    """A producer sends to a consumer, one message every 20 ms, until told the disturbance is over;
    then it sends a few more and finishes once all are accepted."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url)
        self.address = address
        self.flowing = threading.Event()  # set by the client: a message went through
        self.disturbed = threading.Event()  # set by the test: the disturbance is over
        self.sent = 0
        self.received: list[object] = []
        self.accepted = 0
        self.stop_at: int | None = None

    def begin(self) -> None:
        self.receiver = self.container.create_receiver(self.connect(), self.address, name="consumer")
        self.sender = self.container.create_sender(self.connect(), self.address, name="producer")

    def on_link_opened(self, event: Event) -> None:
        if event.link == self.sender:
            self.tick()

    def tick(self) -> None:
        if self.stop_at is None and self.disturbed.is_set():
            self.stop_at = self.sent + 5
        if self.stop_at is not None and self.sent >= self.stop_at:
            return
        if self.sender.credit:
            self.sender.send(Message(body=self.sent))
            self.sent += 1
        self.later(0.02, self.tick)

    def on_message(self, event: Event) -> None:
        self.received.append(event.message.body)
        self.flowing.set()

    def on_accepted(self, event: Event) -> None:
        self.accepted += 1
        if self.accepted == self.stop_at:
            self.done()


def http_request(peer: RawPeer) -> None:
    peer.send(b"GET / HTTP/1.1\r\nHost: meshbus\r\n\r\n")


def random_bytes_after_the_open(peer: RawPeer) -> None:
    peer.open()
    peer.send(random.Random(7).randbytes(64))


def attach_without_begin(peer: RawPeer) -> None:
    """Valid frames in an invalid order: an attach on a session that was never begun."""
    peer.connection.open()
    opening = peer.output()
    session = peer.connection.session()
    session.open()
    peer.output()  # the begin frame, left out
    sender = session.sender("orphan")
    sender.target.address = "test/orphan"
    sender.open()
    peer.send(opening + peer.output())


# How to disturb, and the error condition of the Close frame expected (None: no AMQP, just a header back).
DISTURBANCES: dict[str, tuple[Callable[[RawPeer], None], str | None]] = {
    "http-request": (http_request, None),
    "random-bytes-after-the-open": (random_bytes_after_the_open, "amqp:connection:framing-error"),
    "attach-without-begin": (attach_without_begin, "amqp:not-allowed"),
}


@pytest.mark.parametrize("case", list(DISTURBANCES))
def test_bad_input_on_one_connection_while_another_keeps_working(
    default_router: Router, raw_peer: RawPeers, case: str
) -> None:
    disturb, expected = DISTURBANCES[case]
    traffic = SteadyTraffic(default_router.url, unique("test/steady"))
    running = Running(traffic)
    try:
        assert traffic.flowing.wait(10), "no message went through before the bad input"
        peer = raw_peer(default_router)
        disturb(peer)
        assert peer.read_until_closed(timeout=5), "the router kept a connection that sent bad input"
        line = closed_line(default_router, peer)
        print(line)
        if expected is None:
            assert bytes(peer.received[:8]) in (SASL_HEADER, AMQP_HEADER)
            assert "protocol header" in line
        else:
            peer.decode()
            condition = peer.connection.remote_condition
            assert condition is not None, "the router closed the socket without a Close frame"
            assert condition.name == expected, condition
            assert expected in line
    finally:
        traffic.disturbed.set()
        running.join()
    assert traffic.received == list(range(traffic.sent))
    assert traffic.accepted == traffic.sent


@pytest.mark.parametrize(
    "header",
    [b"AMQP\x02\x01\x00\x00", b"AMQP\x00\x01\x01\x00", b"AMQP\x03\x02\x00\x00", b"amqp\x00\x01\x00\x00"],
    ids=["tls", "amqp-1.1", "sasl-2", "lower-case"],
)
def test_a_wrong_protocol_header_is_answered_with_a_supported_one_then_closed(
    default_router: Router, raw_peer: RawPeers, header: bytes
) -> None:
    peer = raw_peer(default_router)
    peer.send(header)
    assert peer.read_until_closed(timeout=5), "the router kept a connection with a wrong protocol header"
    assert bytes(peer.received[:8]) in (SASL_HEADER, AMQP_HEADER)
    assert re.search(r"protocol header", closed_line(default_router, peer))


def test_control_characters_a_peer_sends_are_escaped_in_the_routers_log(
    default_router: Router, raw_peer: RawPeers
) -> None:
    peer = raw_peer(default_router)
    peer.connection.container = "evil\n2026-01-01 00:00:00,000 INFO meshbus.router: forged"
    peer.open()
    line = default_router.wait_for_log(r"connection opened: .* container=evil.*", timeout=5)
    assert line is not None, "no 'connection opened' line for the peer"
    assert line.group(0).split(" container=")[1].startswith("evil\\x0a2026-01-01 00:00:00,000 INFO")
    assert default_router.wait_for_log(r"^2026-01-01", timeout=0.1) is None, "the peer wrote a log line"


def test_a_peer_that_takes_fewer_links_than_it_attaches_is_dropped_saying_why(
    default_router: Router, raw_peer: RawPeers
) -> None:
    # Its begin allows one link (handle-max 0), then it attaches two: proton cannot answer the second and
    # makes no more output for the connection, which the router must then drop rather than keep.
    peer = raw_peer(default_router)
    peer.connection.open()
    session = peer.connection.session()
    session.open()
    for n in range(2):
        sender = session.sender(f"sender-{n}")
        sender.target.address = unique("test/handles")
        sender.open()
    frames = peer.output()
    begin = frames.index(b"\x00\x53\x11")  # the begin performative; its last field is handle-max
    handle_max = frames.index(b"\x70\x7f\xff\xff\xff", begin + 14)
    peer.send(frames[:handle_max] + b"\x70\x00\x00\x00\x00" + frames[handle_max + 5 :])
    assert peer.read_until_closed(timeout=5), "the router kept a connection proton could no longer serve"
    assert "unable to find an open available handle" in closed_line(default_router, peer)


def test_a_peer_that_never_reads_is_closed_and_the_others_carry_on(
    router: Callable[[Config], Router], raw_peer: RawPeers
) -> None:
    # No idle time-out: only the router's rule for peers that stop reading can close this one.
    patient = router({"listener": [{"idle_timeout": 0}]})
    address = unique("test/never-reads")
    peer = raw_peer(patient, receive_buffer=4096)
    peer.subscribe(address, credit=1000)
    peer.open()
    messages = [Message(body=bytes(MiB)) for _ in range(16)]  # far more than the socket buffers hold
    flood = Exchange(patient.url, address, messages, [])
    flood.timeout = 30.0  # it ends when the router gives up on the peer
    flooding = Running(flood)
    bystander = run(Exchange(patient.url, unique("test/bystander"), numbered("meanwhile", 5)))
    assert bystander.bodies(0) == [f"meanwhile-{n}" for n in range(5)]
    line = closed_line(patient, peer, timeout=30)
    print(line)
    assert "resource-limit-exceeded" in line
    flooding.join()
    outcomes = Counter(o.name for o in flood.settled_outcomes())
    print("flood outcomes:", outcomes)
    assert set(outcomes) <= {"modified", "released"}  # sent to the peer and lost, or never sent
    after = run(Exchange(patient.url, unique("test/after"), numbered("after", 3)))
    assert after.bodies(0) == ["after-0", "after-1", "after-2"]


def test_a_peer_stuck_in_sasl_is_closed(router: Callable[[Config], Router], raw_peer: RawPeers) -> None:
    # Proton's idle time-out only starts with AMQP; the router's own rule covers the SASL layer before it.
    impatient = router({"listener": [{"idle_timeout": 1.0}]})
    peer = raw_peer(impatient)
    peer.send(SASL_HEADER)
    assert peer.read_until_closed(timeout=15), "the router kept a peer that never finished SASL"
    assert bytes(peer.received[:8]) == SASL_HEADER  # it did offer its mechanisms first
    assert "SASL not completed in time" in closed_line(impatient, peer)
