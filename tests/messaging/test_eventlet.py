"""The blocking API in a process that eventlet has monkey-patched (eventlet_peer.py, in a subprocess: patching
this test process would change every other test's threads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Router

PEER = Path(__file__).with_name("eventlet_peer.py")
PEER_TIMEOUT = 60.0  # seconds; the peer's own waits are bounded well below this


def test_green_threads_call_a_server_in_the_same_process(default_router: Router) -> None:
    done = subprocess.run(
        [sys.executable, str(PEER), f"meshbus://{default_router.host}:{default_router.port}/"],
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
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
