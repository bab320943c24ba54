"""Helpers for the messaging tests that need more than one process: an RPC server process to kill
(fault_peer.py) and a free port for a router that must come back on the same one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import Router

FAULT_PEER = Path(__file__).with_name("fault_peer.py")
PEER_WAIT = 15.0  # seconds for a peer to print what it should


def fail_over_url(*routers: Router) -> str:
    """A transport URL with these routers as its fail-over list."""
    return "meshbus://" + ",".join(f"{router.host}:{router.port}" for router in routers) + "/"


def free_port() -> int:
    """A port nothing listens on now, for a router configured to listen on it (and to come back to it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """fault_peer.py serving `topic` as server "peer"; its output lines are collected."""

    def __init__(self, url: str, topic: str, stderr: Path) -> None:
        self.stderr = stderr
        self._lines: list[str] = []
        self._changed = threading.Condition()
        with open(stderr, "w") as errors:
            self.process = subprocess.Popen(
                [sys.executable, str(FAULT_PEER), url, topic],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        threading.Thread(target=self._read, name="fault-peer-stdout", daemon=True).start()
        self.expect("ready")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line.strip())
                self._changed.notify_all()

    def expect(self, line: str) -> None:
        """Wait for the peer to print `line`."""
        with self._changed:
            if not self._changed.wait_for(lambda: line in self._lines, PEER_WAIT):
                errors = self.stderr.read_text()
                raise AssertionError(f"the server process did not print {line!r} in {PEER_WAIT} s:\n{errors}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
