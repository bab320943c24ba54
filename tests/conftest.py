"""Routers as real processes, for every test that needs one (integration, messaging, oslo).

1. `router(config)` starts `meshbus router --config FILE` in a subprocess with the given configuration (a dict
   or TOML text; listeners default to 127.0.0.1 on an ephemeral port) and returns a `Router` once it logs
   `listening on HOST:PORT`. It is stopped, by its PID, when the test ends. Each router keeps its store
   (issue 6) in a directory of the test's own (`Router.state`) unless its configuration says otherwise.
2. `default_router` is one router shared by the whole session, for tests that need no special configuration.
3. When a test fails, the log lines each of its routers wrote during the test are added to the report.
4. `rhea_peer(mode, url, **args)` starts a rhea client (tests/rhea.py), for the interop tests wherever they
   need one; a test using it skips, saying why, where Node.js, npm or the npm registry is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests import rhea
from tests.json_peers import Start

START_TIMEOUT = 15.0  # seconds for a router to start listening
STOP_TIMEOUT = 10.0  # seconds for a router to exit after SIGTERM
_LISTENING = re.compile(r"listening on (\S+):(\d+)")

# Distribution rules of the shared router, for addresses under test/.
DEFAULT_ADDRESSES = [
    {"prefix": "test/closest", "distribution": "closest"},
    {"prefix": "test/multicast", "distribution": "multicast"},
    {"prefix": "test/unavailable", "distribution": "unavailable"},
]

Config = Mapping[str, Any] | str


class Router:
    """A router process started by a test; its stderr is collected line by line."""

    def __init__(self, name: str, config_path: Path, command: str = "router") -> None:
        self.name = name
        self.config_path = config_path
        # The store's default place ($XDG_STATE_HOME/meshbus/<id>.db), one per router name: a router started
        # again under its name (after a kill) finds its store.
        self.state = config_path.parent / f"{name}-state"
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshbus", command, "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "XDG_STATE_HOME": str(self.state)},
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stderr", daemon=True)
        self._reader.start()
        found = self.wait_for_log(_LISTENING, START_TIMEOUT)
        if found is None:
            self.kill()
            raise RuntimeError(f"router {name} did not start listening:\n{self.log()}")
        self.host, self.port = found.group(1), int(found.group(2))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"amqp://{self.host}:{self.port}"

    def _read(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        for line in stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the log, for `log(since)`."""
        with self._changed:
            return len(self._lines)

    def log(self, since: int = 0) -> str:
        with self._changed:
            return "".join(self._lines[since:])

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float, since: int = 0
    ) -> re.Match[str] | None:
        """The first log line after `since` matching `pattern`, waiting up to `timeout` seconds for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[since:]:
                    found = regex.search(line)
                    if found is not None:
                        return found
                since = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    return None
                self._changed.wait(min(remaining, 0.1))

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (or SIGINT), then wait: a router must exit 0 on it."""
        if self.process.poll() is None:
            os.kill(self.pid, signum)
        try:
            code = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"router {self.name} still running {STOP_TIMEOUT} s after {signum.name}"
            ) from None
        self._reader.join(STOP_TIMEOUT)
        assert code == 0, f"router {self.name} exited {code}:\n{self.log()}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()


def to_toml(config: Mapping[str, Any]) -> str:
    """TOML for the configuration schema's shapes: tables of scalars and lists, and arrays of such tables."""
    lines: list[str] = []
    for name, value in config.items():
        tables = value if isinstance(value, list) else [value]
        header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
        for table in tables:
            lines.append(header)
            # JSON's strings, numbers, booleans and arrays of them are valid TOML values.
            lines.extend(f"{key} = {json.dumps(item)}" for key, item in table.items())
            lines.append("")
    return "\n".join(lines)


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """Listeners on 127.0.0.1 and an ephemeral port unless the test says otherwise."""
    result = dict(config)
    listeners = result.get("listener", [{}])
    result["listener"] = [{"host": "127.0.0.1", "port": 0, **listener} for listener in listeners]
    return result


def start_router(directory: Path, name: str, config: Config, command: str = "router") -> Router:
    """`meshbus router` (or `command`, e.g. "store") with this configuration."""
    path = directory / f"{name}.toml"
    path.write_text(config if isinstance(config, str) else to_toml(with_defaults(config)))
    return Router(name, path, command)


_ROUTERS = pytest.StashKey[list[tuple[Router, int]]]()


def _watch(request: pytest.FixtureRequest, router: Router, since: int) -> None:
    """Attach the router's log from line `since` on to the test's report if it fails."""
    request.node.stash.setdefault(_ROUTERS, []).append((router, since))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for router, since in item.stash.get(_ROUTERS, []):
            report.sections.append((f"router {router.name} (pid {router.pid}) log", router.log(since)))


class StartRouter(Protocol):
    def __call__(self, config: Config, name: str | None = None) -> Router: ...


@pytest.fixture
def router(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartRouter]:
    """Start a router with this configuration (dict or TOML text); after the test, SIGTERM must exit it 0.
    `name`: a router's name again restarts it (the same store file); by default each router is new."""
    started: list[Router] = []

    def start(config: Config, name: str | None = None) -> Router:
        started_router = start_router(tmp_path, name or f"router{len(started)}", config)
        started.append(started_router)
        _watch(request, started_router, 0)
        return started_router

    yield start
    try:
        for started_router in started:
            if started_router.process.poll() is None:
                started_router.stop()
    finally:
        for started_router in started:
            started_router.kill()


@pytest.fixture(scope="session")
def _shared_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    shared = start_router(tmp_path_factory.mktemp("shared-router"), "shared", {"address": DEFAULT_ADDRESSES})
    yield shared
    shared.stop()


@pytest.fixture
def default_router(request: pytest.FixtureRequest, _shared_router: Router) -> Router:
    """The session's shared router (default listener settings, the DEFAULT_ADDRESSES rules)."""
    assert _shared_router.process.poll() is None, f"the shared router died:\n{_shared_router.log()}"
    _watch(request, _shared_router, _shared_router.mark())
    return _shared_router


@pytest.fixture
def rhea_peer() -> Iterator[Start]:
    rhea.require_node()
    with rhea.peers() as start:
        yield start
