"""oslo.messaging 14.9.1, the last release with an AMQP 1.0 driver, in a virtualenv of its own for tests.

1. `python()` makes `<repo>/.cache/oslo14-venv` the first time a test asks for it (tests/cached.py: it
   outlives the session, made again when the requirement list or the Python changes) and returns its
   interpreter.
2. `peers()` starts tests/oslo14_peer.py with that interpreter (json_peers.py collects the JSON lines it
   prints); `url` and `notify_every_priority` are what the interop tests share.
3. Nothing here imports oslo: its dependencies (eventlet, oslo.*) stay out of the test suite's environment.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests import cached, json_peers
from tests.conftest import Router
from tests.json_peers import Peer, Start, printed

__all__ = ["PRIORITIES", "Peer", "Start", "notify_every_priority", "peers", "printed", "url"]

VENV = cached.CACHE / "oslo14-venv"
PEER = Path(__file__).resolve().parent / "oslo14_peer.py"

# oslo.messaging 14.9.1 leaves its dependencies unpinned; the oslo libraries (and eventlet, which they import)
# are pinned to releases that run it, as those are dropping eventlet support release by release.
REQUIREMENTS = (
    "oslo.messaging==14.9.1",
    "pyngus==2.3.1",
    "python-qpid-proton==0.40.0",
    "oslo.config==10.7.0",
    "oslo.context==6.5.0",
    "oslo.log==8.3.2",
    "oslo.metrics==0.17.0",
    "oslo.middleware==8.2.0",
    "oslo.serialization==5.11.0",
    "oslo.service==4.8.0",
    "oslo.utils==10.2.0",
    "eventlet==0.41.3",
    "futurist==3.5.0",
)


def _marker_text() -> str:
    return "\n".join([*REQUIREMENTS, f"# python {sys.version.split()[0]} at {sys.base_prefix}"]) + "\n"


@functools.cache
def python() -> Path:
    """The oslo 14.9.1 virtualenv's interpreter, the virtualenv made first if it is missing or stale."""
    interpreter = VENV / "bin" / "python"
    pip = [str(interpreter), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    cached.make(
        VENV,
        _marker_text(),
        [[sys.executable, "-m", "venv", str(VENV)], [*pip, *REQUIREMENTS]],
        what="the oslo.messaging 14.9.1 virtualenv",
        index=_index_address,
    )
    return interpreter


def _index_address() -> tuple[str, int]:
    """Where pip downloads from: PIP_INDEX_URL's host, else PyPI."""
    url = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    return url.hostname or "pypi.org", url.port or (80 if url.scheme == "http" else 443)


def peers() -> AbstractContextManager[Start]:
    """`json_peers.peers` of tests/oslo14_peer.py in the oslo 14.9.1 virtualenv."""
    return json_peers.peers(lambda *args: Peer([str(python()), str(PEER), *args]))


# oslo's notification priorities, as the peer's notifier takes them.
PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


def require_python() -> Path:
    """`python()`, or the calling test skipped, saying why, when the package index cannot be reached."""
    return cached.require(python)


def url(router: Router) -> str:
    """The peers' transport URL for `router` (oslo 14's `amqp://`)."""
    return f"{router.url}/"


def notify_every_priority(
    start: Start, router: Router, topic: str, publisher: str, driver: str, context: dict[str, Any]
) -> None:
    """An oslo 14 notifier (`driver`: messaging or messagingv2) sends one notification of each priority:
    event type `<driver>.<priority>`, payload {"n": its index in PRIORITIES}."""
    notes = [
        json.dumps({"priority": priority, "event_type": f"{driver}.{priority}", "payload": {"n": n}})
        for n, priority in enumerate(PRIORITIES)
    ]
    notifier = start(
        url(router),
        "notifier",
        "--topic",
        topic,
        "--publisher",
        publisher,
        "--driver",
        driver,
        "--context",
        json.dumps(context),
        *notes,
    )
    assert notifier.finish() == [{"sent": priority} for priority in PRIORITIES]
