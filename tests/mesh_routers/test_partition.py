"""A silent partition between two routers in network namespaces of their own, and its healing.

Router A in one namespace, router B in the other, B connected to A over a veth pair; a client on A calls a
server on B. The link goes down: no socket is closed, nothing passes. Each side declares the other dead
after its hello time-out, a request caught in the partition comes back to its client, and with B's
addresses gone from A new calls fail at once instead of waiting for their time-out. The link comes back:
the routers find each other again by themselves and calls succeed.
"""

from __future__ import annotations

import concurrent.futures
import uuid

import pytest

from meshbus.messaging import MessageUndeliverable, RPCClient, RPCServer, Target, Transport
from tests.mesh_routers.conftest import (
    WAIT,
    Mesh,
    NamespacePair,
    Recorder,
    answered,
    neighbour_down,
    neighbour_up,
    unreachable,
    url_of,
)

CALLS = 20
TIMEOUT = 30.0  # seconds per call: longer than the partition lasts, so a call that waits it out is seen


def test_a_silent_partition_is_detected_and_heals(namespace_pair: NamespacePair, mesh: Mesh) -> None:
    net = namespace_pair
    mesh.start("A", host=net.left_address, namespace=net.left)
    mesh.start("B", to={"A": 1}, host=net.right_address, namespace=net.right)
    mesh.converged()
    topic = f"partition-{uuid.uuid4().hex[:8]}"
    # Made in the namespaces' threads, so their I/O threads and sockets are there too.
    client_transport = net.left.run(Transport, url_of(mesh["A"]))
    server_transport = net.right.run(Transport, url_of(mesh["B"]))
    recorder = Recorder()
    server = RPCServer(server_transport, Target(topic=topic, server="s1"), [recorder])
    caught = concurrent.futures.ThreadPoolExecutor(1)
    try:
        server.start()
        client = RPCClient(client_transport, Target(topic=topic), timeout=TIMEOUT)
        answered(client)
        assert [client.call({}, "echo", n=n) for n in range(CALLS)] == list(range(CALLS))
        for n in range(CALLS, 2 * CALLS):
            client.cast({}, "record", n=n)

        marks = mesh.marks()
        net.cut()
        # Sent into the partition before anyone knows of it: the router must give it back when B is
        # declared dead, and then nobody serves the address.
        in_partition = caught.submit(client.call, {}, "echo", n=-1)
        for router_id, other in (("A", "B"), ("B", "A")):
            mesh.expect(router_id, neighbour_down(other), marks)
        mesh.expect("A", unreachable("B"), marks)
        with pytest.raises(MessageUndeliverable):
            in_partition.result(TIMEOUT + WAIT)
        for _ in range(3):
            with pytest.raises(MessageUndeliverable):
                client.call({}, "ping")  # released at once: no waiting for the time-out

        marks = mesh.marks()
        net.heal()
        for router_id, other in (("A", "B"), ("B", "A")):
            mesh.expect(router_id, neighbour_up(other), marks)
        mesh.joined("B", marks)
        answered(client)
        assert [client.call({}, "echo", n=n) for n in range(2 * CALLS, 3 * CALLS)] == list(
            range(2 * CALLS, 3 * CALLS)
        )
    finally:
        caught.shutdown(wait=False)
        server.stop()
        server.wait()
        client_transport.close()
        server_transport.close()
    assert recorder.missing(range(3 * CALLS)) == set(), "acknowledged, then lost"
    assert -1 not in recorder.runs, "the request caught in the partition reached the server"
