"""A Transport in a process that forks (fork_peer.py, in a subprocess: forking this test process, with its
threads, would copy them half-way): the child cannot use the parent's transport, and says so at once instead
of waiting for an I/O thread that stayed in the parent; a transport of its own works."""

from __future__ import annotations

from tests.conftest import Router
from tests.json_peers import report_of


def test_a_forked_child_is_told_to_make_its_own_transport_and_the_parents_goes_on(
    default_router: Router,
) -> None:
    report = report_of("tests.messaging.fork_peer", f"meshbus://{default_router.host}:{default_router.port}/")
    parent = report["parent"]
    assert report["before"] == {"text": "before", "served_by": parent}
    assert "before it forked this one" in report["inherited"]
    assert "Make a new Transport in this process" in report["inherited"]
    assert report["own"] == {"text": "own", "served_by": parent}
    assert report["after"] == {"text": "after", "served_by": parent}
