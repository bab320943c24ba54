"""The plugin in an oslo.messaging service on eventlet (eventlet_peer.py, in a subprocess: patching this test
process would change every other test's threads): oslo picks its eventlet executor, and its polling thread is
a green thread of the service's one OS thread."""

from __future__ import annotations

from tests.conftest import Router
from tests.json_peers import report_of


def test_an_oslo_service_on_eventlet_calls_casts_and_notifies_through_the_plugin(
    default_router: Router,
) -> None:
    report = report_of("tests.oslo.eventlet_peer", f"meshbus://{default_router.host}:{default_router.port}/")
    assert report["executor"] == "eventlet"
    # Twenty calls in progress at once, each answered only once all twenty had arrived: the polling thread and
    # the callers waited without blocking the hub, and the endpoints ran as green threads of the main thread.
    assert report["gathered"] == [number * 2 for number in range(20)]
    assert report["endpoint_os_threads"] == [True]
    assert report["slow"] == "slept"
    assert report["ticked_during_call"] is True
    assert report["monitored"] == "slept"
    assert report["casts"] == [0, 1, 2, 3, 4, 5]
    assert report["notified"] == [["peer.event", 0], ["peer.event", 1], ["peer.event", 2]]
    assert report["batches"] == [[0, 1]]  # batch_size 5: what came, once batch_timeout had passed
    assert report["answered_while_stopping"] == "slept"
