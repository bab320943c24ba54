"""Peers in processes of their own that print one JSON object per line: oslo 14's (tests/oslo14.py), rhea's
(tests/rhea.py). `Peer` collects what one prints and waits for the lines a test expects; `peers()` starts
them and kills, by PID, those still running at the end. `report_of` runs a peer that prints one report as
its last line (the eventlet and fork tests' scripts, which must not run in the test process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PEER_TIMEOUT = 30.0  # seconds for a peer to print an expected line or to exit
REPO = Path(__file__).resolve().parent.parent


class Peer:
    """A peer process started with `argv` (and `env` added to this one's environment). It prints one JSON
    object per line on stdout; one that serves runs until its stdin closes, one that acts exits when done."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._lines: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.argv,
            env=None if env is None else {**os.environ, **env},
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
            f"{' '.join(self.argv)} (pid {self.process.pid}, exit {self.process.poll()})\n"
            f"--- stdout\n{lines}\n--- stderr (last lines)\n{stderr}"
        )


@contextmanager
def peers(command: Callable[..., Peer]) -> Iterator[Callable[..., Peer]]:
    """Start peers with the returned function (`command`'s arguments, `command` making each); any still
    running at the end are killed, by PID."""
    started: list[Peer] = []

    def start(*args: Any, **kwargs: Any) -> Peer:
        peer = command(*args, **kwargs)
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            peer.kill()


Start = Callable[..., Peer]


def printed(peer: Peer, **fields: Any) -> dict[str, Any]:
    """The line `peer` printed with these fields (and maybe others), waiting for it."""
    return peer.expect(lambda line: fields.items() <= line.items())


def report_of(module: str, *args: str, timeout: float = 2 * PEER_TIMEOUT) -> dict[str, Any]:
    """Run `python -m module args...` from the repository (its scripts import the tests' helpers) and
    return the JSON object it printed last, once it has exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{module} exited {done.returncode}:\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report
