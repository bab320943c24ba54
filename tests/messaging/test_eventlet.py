"""The blocking API in a process that eventlet has monkey-patched (eventlet_peer.py, in a subprocess: patching
this test process would change every other test's threads)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import Router
from tests.json_peers import report_of

PEER_TIMEOUT = 60.0  # seconds; the peer's own waits are bounded well below this


def test_green_threads_call_a_server_in_the_same_process(default_router: Router) -> None:
    report = report_of(
        "tests.messaging.eventlet_peer", f"meshbus://{default_router.host}:{default_router.port}/"
    )
    # Twenty calls in progress at once, each answered only when all twenty had arrived: callers waiting
    # for replies left the hub free, and the endpoints ran concurrently in green threads of the main thread.
    assert report["gathered"] == [number * 2 for number in range(20)]
    assert report["endpoint_os_threads"] == [True]
    assert report["slow"] == "slept"
    assert report["ticked_during_call"] is True
    assert report["abandoned"] == "timeout"
    assert report["after_abandon"] == 42
    assert report["casts"] == [0, 1, 2, 3, 4]
    assert report["notified"] == 5


def test_meshbus_does_not_import_eventlet() -> None:
    """Eventlet is looked for only where the application imported it (and then only if it patched)."""
    probe = "import sys, meshbus.messaging; print('eventlet' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=PEER_TIMEOUT)
    assert done.stdout.strip() == "False", done.stderr
