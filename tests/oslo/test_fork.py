"""The plugin in a service that forks its workers after it made its transports (fork_peer.py, in a
subprocess: forking this test process, with its threads, would copy them half-way), on threads or on
eventlet (eventlet_fork_peer.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Router

PEERS = {"threads": "fork_peer.py", "eventlet": "eventlet_fork_peer.py"}
PEER_TIMEOUT = 60.0  # seconds; the peer gives up on its child well before


@pytest.mark.parametrize("service", PEERS)
def test_a_worker_forked_after_the_transport_was_made_calls_and_notifies_through_it(
    default_router: Router, service: str
) -> None:
    peer = Path(__file__).with_name(PEERS[service])
    done = subprocess.run(
        [sys.executable, str(peer), f"meshbus://{default_router.host}:{default_router.port}/"],
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    parent = report["parent_pid"]
    assert report["parent_answer"] == {"text": "first", "served_by": parent}
    # The child's call reached the server in the parent on a connection of the child's own, and the parent's
    # connection still served it: the child neither used nor closed what it inherited.
    assert report.get("child_error") is None
    assert report["child_pid"] != parent
    assert report["child_answer"] == {"text": "from the child", "served_by": parent}
    assert report["notified"] == ["child.event"]
