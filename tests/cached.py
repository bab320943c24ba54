"""Tools the interop tests install for themselves under `<repo>/.cache`: oslo.messaging 14.9.1's virtualenv
(tests/oslo14.py), rhea's node_modules (tests/rhea.py).

`make()` builds a directory once and keeps it across sessions: a marker file in it holds what it was made
from, and any change to that makes it again. Test processes running at once wait on a lock file. When a step
fails because the package index cannot be reached, `NoNetwork` says so, and the tests that need the tool
skip (`require`); any other failure is an error.
"""

from __future__ import annotations

import fcntl
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

CACHE = Path(__file__).resolve().parent.parent / ".cache"
INSTALL_TIMEOUT = 600.0  # seconds for one step on a cold cache
MARKER = "meshbus-requirements.txt"

T = TypeVar("T")


class NoNetwork(RuntimeError):
    """The tool could not be installed because its package index cannot be reached."""


def make(
    directory: Path,
    made_from: str,
    steps: Sequence[Sequence[str]],
    *,
    what: str,
    index: Callable[[], tuple[str, int]],
    cwd: Path | None = None,
) -> None:
    """Run `steps` (commands, in `cwd`, default `directory`) into an empty `directory` unless its marker
    already says `made_from`. `what` names the tool in errors; `index()` says where it downloads from
    (host, port)."""
    marker = directory / MARKER
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if marker.exists() and marker.read_text() == made_from:
            return
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        for command in steps:
            _run(list(command), cwd or directory, what, index)
        marker.write_text(made_from)  # last: a half-made directory has no marker


def _run(command: list[str], cwd: Path, what: str, index: Callable[[], tuple[str, int]]) -> None:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    if done.returncode == 0:
        return
    output = (done.stdout + done.stderr).strip()[-2000:]
    host, port = index()
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        raise NoNetwork(
            f"cannot install {what}: its package index {host}:{port} is unreachable ({error}); "
            f"{command[0]} said:\n{output}"
        ) from None
    raise RuntimeError(f"installing {what} failed: {command}\n{output}")


def require(tool: Callable[[], T]) -> T:
    """`tool()`, or the calling test skipped, saying why, when the tool's package index cannot be reached."""
    try:
        return tool()
    except NoNetwork as error:
        pytest.skip(str(error))
