"""Call monitoring: a server sends heartbeats while it works on a call whose caller asked for them
(`call_monitor_timeout`), and the caller fails as soon as they stop instead of waiting out its time-out."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshbus.messaging import MessagingTimeout, RPCClient, RPCServer, Target, Transport, wire
from tests.conftest import Router
from tests.messaging.peers import ServerProcess, fail_over_url

MONITOR = 1.5  # seconds: heartbeats every 0.75 s


@pytest.fixture
def server_process(tmp_path: Path, default_router: Router) -> Iterator[Callable[[str], ServerProcess]]:
    started: list[ServerProcess] = []

    def start(topic: str) -> ServerProcess:
        started.append(
            ServerProcess(fail_over_url(default_router), topic, tmp_path / f"peer{len(started)}.err")
        )
        return started[-1]

    yield start
    for peer in started:
        peer.kill()


@pytest.fixture
def topic() -> str:
    return f"monitor-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def transport(default_router: Router) -> Iterator[Transport]:
    with Transport(fail_over_url(default_router)) as opened:
        yield opened


def test_the_request_carries_the_monitor_interval_and_a_heartbeat_has_no_body() -> None:
    request = wire.encode_request(
        "a", {"method": "m", "args": {}}, {}, message_id="m-1", call_monitor_timeout=2
    )
    assert wire.decode_request(request).call_monitor_timeout == 2
    assert wire.decode_request(wire.encode_request("a", {"method": "m"}, {})).call_monitor_timeout is None
    assert wire.decode_reply(wire.encode_heartbeat("reply/1", "m-1", ttl=2.0)) == ("m-1", None)


class Sleeper:
    def sleep(self, ctxt: dict[str, Any], seconds: float) -> str:
        time.sleep(seconds)
        return "rested"


def test_heartbeats_keep_a_call_alive_longer_than_its_monitor_interval(
    transport: Transport, topic: str
) -> None:
    server = RPCServer(transport, Target(topic=topic, server="s"), [Sleeper()])
    server.start()
    try:
        client = RPCClient(transport, Target(topic=topic), timeout=30, call_monitor_timeout=MONITOR)
        assert client.call({}, "sleep", seconds=2 * MONITOR) == "rested"
    finally:
        server.stop()
        server.wait()


def call_and_kill(client: RPCClient, peer: ServerProcess) -> tuple[BaseException, float]:
    """Call the peer's slow method, kill the peer once it works on it: the call's error, and the seconds
    from the kill to the error."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.call, {}, "work", seconds=60)
        peer.expect("working")
        killed = time.monotonic()
        peer.kill()
        error = call.exception(timeout=60)
    assert error is not None, "the call to a killed server returned"
    return error, time.monotonic() - killed


def test_a_monitored_call_fails_soon_after_its_server_dies(
    transport: Transport, server_process: Callable[[str], ServerProcess], topic: str
) -> None:
    client = RPCClient(transport, Target(topic=topic), timeout=30)
    # Set by prepare() this time (the other test sets it on the client).
    error, waited = call_and_kill(client.prepare(call_monitor_timeout=MONITOR), server_process(topic))
    assert isinstance(error, MessagingTimeout)
    assert "the server stopped responding" in str(error)
    assert waited < 10, f"the monitored call failed {waited:.1f} s after its server died (time-out 30 s)"


def test_without_a_monitor_a_call_to_a_server_that_died_times_out(
    transport: Transport, server_process: Callable[[str], ServerProcess], topic: str
) -> None:
    error, _ = call_and_kill(RPCClient(transport, Target(topic=topic), timeout=3), server_process(topic))
    assert isinstance(error, MessagingTimeout)
    assert "within 3 s" in str(error)
