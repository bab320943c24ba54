"""The plugin in a service that forks its workers after it made its transports (fork_peer.py, in a
subprocess: forking this test process, with its threads, would copy them half-way), on threads or on
eventlet (eventlet_fork_peer.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Router
from tests.json_peers import report_of

PEERS = {"threads": "tests.oslo.fork_peer", "eventlet": "tests.oslo.eventlet_fork_peer"}


@pytest.mark.parametrize("service", PEERS)
def test_a_worker_forked_after_the_transport_was_made_calls_and_notifies_through_it(
    default_router: Router, service: str
) -> None:
    report = report_of(PEERS[service], f"meshbus://{default_router.host}:{default_router.port}/")
    parent = report["parent_pid"]
    assert report["parent_answer"] == {"text": "first", "served_by": parent}
    # The child's call reached the server in the parent on a connection of the child's own, and the parent's
    # connection still served it: the child neither used nor closed what it inherited.
    assert report.get("child_error") is None
    assert report["child_pid"] != parent
    assert report["child_answer"] == {"text": "from the child", "served_by": parent}
    assert report["notified"] == ["child.event"]
