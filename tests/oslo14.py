"""oslo.messaging 14.9.1, the last release with an AMQP 1.0 driver, in a virtualenv of its own for tests.

1. `python()` makes `<repo>/.cache/oslo14-venv` the first time a test asks for it and returns its interpreter.
   The virtualenv outlives the session: a marker file in it holds the requirement list (and the Python) it was
   made from, and any change to either makes it again. Test processes running at once wait on a lock file.
2. `Peer` runs tests/oslo14_peer.py with that interpreter and collects the JSON lines it prints; `peers()`
   starts them (`Start`) and kills them at the end; `printed`, `url` and `notify_every_priority` are what the
   interop tests share.
3. Nothing here imports oslo: its dependencies (eventlet, oslo.*) stay out of the test suite's environment.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Router

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".cache" / "oslo14-venv"
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
INSTALL_TIMEOUT = 600.0  # seconds for pip on a cold cache
PEER_TIMEOUT = 30.0  # seconds for a peer to print an expected line or to exit


class NoNetwork(RuntimeError):
    """The virtualenv could not be made because the package index cannot be reached."""


def _marker_text() -> str:
    return "\n".join([*REQUIREMENTS, f"# python {sys.version.split()[0]} at {sys.base_prefix}"]) + "\n"


@functools.cache
def python() -> Path:
    """The oslo 14.9.1 virtualenv's interpreter, the virtualenv made first if it is missing or stale."""
    marker = VENV / "meshbus-requirements.txt"
    interpreter = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "oslo14-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if interpreter.exists() and marker.exists() and marker.read_text() == _marker_text():
            return interpreter
        shutil.rmtree(VENV, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(VENV)])
        _run(
            [
                str(interpreter),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *REQUIREMENTS,
            ]
        )
        marker.write_text(_marker_text())  # last: a half-made virtualenv has no marker
    return interpreter


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    if done.returncode == 0:
        return
    output = (done.stdout + done.stderr).strip()[-2000:]
    host, port = _index_address()
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        raise NoNetwork(
            f"cannot make the oslo.messaging 14.9.1 virtualenv in {VENV}: the package index {host}:{port} "
            f"is unreachable ({error}); pip said:\n{output}"
        ) from None
    raise RuntimeError(f"making the oslo.messaging 14.9.1 virtualenv in {VENV} failed: {command}\n{output}")


def _index_address() -> tuple[str, int]:
    """Where pip downloads from: PIP_INDEX_URL's host, else PyPI."""
    url = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    return url.hostname or "pypi.org", url.port or (80 if url.scheme == "http" else 443)


class Peer:
    """tests/oslo14_peer.py in the oslo 14.9.1 virtualenv. It prints one JSON object per line on stdout;
    servers and listeners run until their stdin closes, clients and notifiers exit when done."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self._lines: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [str(python()), str(PEER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self._stdout_line), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self._stderr.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _stdout_line(self, line: str) -> None:
        try:
            self._lines.append(json.loads(line))
        except json.JSONDecodeError:
            self._lines.append({"unparsed": line})  # kept for the failure report

    def _read(self, stream: Any, keep: Callable[[str], None]) -> None:
        for line in stream:
            with self._changed:
                keep(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def lines(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._lines)

    def expect(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = PEER_TIMEOUT
    ) -> dict[str, Any]:
        """The first line so far, or to come within `timeout` seconds, that `predicate` accepts."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                finished = self.process.poll() is not None and not any(r.is_alive() for r in self._readers)
                if remaining <= 0 or finished:
                    raise AssertionError(f"no expected line after {timeout} s from {self.describe()}")
                self._changed.wait(min(remaining, 0.1))

    def finish(self, timeout: float = PEER_TIMEOUT) -> list[dict[str, Any]]:
        """Close stdin, wait for a clean exit and return every line printed."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"peer still running {timeout} s after its stdin closed: {self.describe()}"
            ) from None
        for reader in self._readers:
            reader.join(timeout)
        assert code == 0, f"peer exited {code}: {self.describe()}"
        return self.lines()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def describe(self) -> str:
        with self._changed:
            lines = "\n".join(json.dumps(line) for line in self._lines)
            stderr = "\n".join(self._stderr[-60:])
        return (
            f"oslo14_peer.py {' '.join(self.args)} (pid {self.process.pid}, exit {self.process.poll()})\n"
            f"--- stdout\n{lines}\n--- stderr (last lines)\n{stderr}"
        )


@contextmanager
def peers() -> Iterator[Callable[..., Peer]]:
    """Start peers with the returned function; any still running at the end are killed, by PID."""
    started: list[Peer] = []

    def start(*args: str) -> Peer:
        peer = Peer(*args)
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            peer.kill()


Start = Callable[..., Peer]

# oslo's notification priorities, as the peer's notifier takes them.
PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


def require_python() -> Path:
    """`python()`, or the calling test skipped, saying why, when the package index cannot be reached."""
    try:
        return python()
    except NoNetwork as error:
        pytest.skip(str(error))


def url(router: Router) -> str:
    """The peers' transport URL for `router` (oslo 14's `amqp://`)."""
    return f"{router.url}/"


def printed(peer: Peer, **fields: Any) -> dict[str, Any]:
    """The line `peer` printed with these fields (and maybe others), waiting for it."""
    return peer.expect(lambda line: fields.items() <= line.items())


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
