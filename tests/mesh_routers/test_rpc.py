"""RPC across routers in a line A - B - C: a client on one end, a server on the other, both ways. Requests
go to the server's anycast and unicast addresses; replies come back on the client router's dynamic
address, so they cross the mesh by router id."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from meshbus.messaging import MessageUndeliverable, RPCClient, RPCServer, Target, Transport
from tests.json_peers import Start, printed
from tests.mesh_routers.conftest import Mesh, Recorder, answered, url_of

CALLS = 50
TIMEOUT = 10.0  # seconds per call: they take milliseconds


@pytest.fixture
def line(mesh: Mesh) -> Mesh:
    mesh.start("A")
    mesh.start("B", to={"A": 1})
    mesh.start("C", to={"B": 1})
    mesh.converged()
    return mesh


def test_a_client_on_one_end_calls_a_server_on_the_other_both_ways_and_nobody_fails_fast(line: Mesh) -> None:
    topic = f"line-{uuid.uuid4().hex[:8]}"
    transports = {router_id: Transport(url_of(line[router_id])) for router_id in ("A", "C")}
    servers: list[RPCServer] = []
    try:
        for client_side, server_side in (("A", "C"), ("C", "A")):
            recorder = Recorder()
            server_topic = f"{topic}-on-{server_side}"
            server = RPCServer(transports[server_side], Target(topic=server_topic, server="s1"), [recorder])
            server.start()
            servers.append(server)
            client = RPCClient(transports[client_side], Target(topic=server_topic), timeout=TIMEOUT)
            answered(client)
            assert [client.call({}, "echo", n=n) for n in range(CALLS)] == list(range(CALLS))
            to_server = client.prepare(server="s1")  # the unicast address
            assert [to_server.call({}, "echo", n=n) for n in range(CALLS, 2 * CALLS)] == list(
                range(CALLS, 2 * CALLS)
            )
            for n in range(2 * CALLS, 3 * CALLS):
                client.cast({}, "record", n=n)  # returns once the server took it
            assert recorder.missing(range(3 * CALLS)) == set(), f"from {client_side} to {server_side}"
            assert recorder.runs == Counter(range(3 * CALLS)), "each request ran exactly once"
        nobody = RPCClient(transports["A"], Target(topic=f"{topic}-nobody"), timeout=60.0)
        with pytest.raises(MessageUndeliverable):
            nobody.call({}, "ping")  # nobody serves it on any router: released at once, no time-out
    finally:
        for server in servers:
            server.stop()
            server.wait()
        for transport in transports.values():
            transport.close()


def test_a_rhea_client_on_one_end_calls_a_rhea_server_on_the_other(line: Mesh, rhea_peer: Start) -> None:
    """Standard clients need nothing of the mesh: the caller's sender gets credit once the server's address
    has reached its router, and the replies find the caller's dynamic address by its router's id."""
    address = f"rhea/line-{uuid.uuid4().hex[:8]}"
    server = rhea_peer("serve", line["C"].url, address=address)
    printed(server, ready=True)
    requests = [f"request-{n}" for n in range(CALLS)]
    caller = rhea_peer("call", line["A"].url, address=address, requests=requests)
    replies = sorted((reply["correlation_id"], reply["reply"]["echo"]) for reply in caller.finish())
    assert replies == list(enumerate(requests))
    server.finish()
