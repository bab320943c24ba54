"""The router process: orderly shutdown on SIGTERM, and the message a bad configuration file gets."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from proton import Event

from tests.conftest import Config, Router
from tests.integration.clients import Client, Running, the, unique


class Idle(Client):
    """`count` open connections (one with a consumer) that wait for the router to close them."""

    timeout = 20.0

    def __init__(self, url: str, count: int) -> None:
        super().__init__(url)
        self.count = count
        self.ready = threading.Event()  # every connection and the consumer are open
        self.opened = 0
        self.attached = False
        self.closes: list[str | None] = []  # the condition of each Close frame the router sent

    def begin(self) -> None:
        for _ in range(self.count):
            self.connect()
        self.container.create_receiver(self.connections[0], unique("test/shutdown"), name="consumer")

    def on_connection_opened(self, event: Event) -> None:
        self.opened += 1
        self._check_ready()

    def on_link_opened(self, event: Event) -> None:
        self.attached = True
        self._check_ready()

    def _check_ready(self) -> None:
        if self.opened == self.count and self.attached:
            self.ready.set()

    def on_connection_remote_close(self, event: Event) -> None:
        condition = the(event.connection).remote_condition
        self.closes.append(condition.name if condition else None)
        if len(self.closes) == self.count:
            self.done()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_closes_every_connection_with_a_close_frame_and_exits_0(
    router: Callable[[Config], Router], signum: signal.Signals
) -> None:
    stopping = router({})
    client = Idle(stopping.url, count=3)
    running = Running(client)
    try:
        assert client.ready.wait(10), f"the clients did not open: {client.status()}"
        stopping.stop(signum)  # fails unless the router exits 0
    finally:
        running.join()  # fails if a connection dropped without a Close frame
    print("Close conditions:", client.closes)
    assert len(client.closes) == 3


BAD_CONFIGS = {
    "wrong-type": (
        '[router]\nid = "r"\n\n[[listener]]\nhost = "127.0.0.1"\nport = "5672"\n',
        6,
        "listener[0].port",
    ),
    "unknown-field": ('[[address]]\nprefix = "a"\ndistrbution = "multicast"\n', 3, "address[0].distrbution"),
    "bad-choice": (
        '# addresses\n[[address]]\nprefix = "a/b"\ndistribution = "broadcast"\n',
        4,
        "address[0].distribution",
    ),
    "second-table": ("[[listener]]\nport = 0\n\n[[listener]]\nport = 70000\n", 5, "listener[1].port"),
    "toml-syntax": ("[[listener]\nport = 1\n", 1, "invalid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_file_is_reported_with_file_line_and_field(tmp_path: Path, case: str) -> None:
    text, line, field = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "meshbus", "router", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(result.stderr)
    assert result.returncode == 2
    assert f"{path}:{line}:" in result.stderr
    assert field in result.stderr
    assert "Traceback" not in result.stderr
