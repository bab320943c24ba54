"""A private RabbitMQ node (Debian's rabbitmq-server) for the benchmarks and the tests.

Owns: the node's temporary directory (configuration, enabled plugins, data, logs, Erlang cookie under its
own HOME), its own epmd on a port of its own, ports chosen free on 127.0.0.1, waiting until the AMQP port
answers, and stopping both processes by PID.
Must not: install anything, listen beyond 127.0.0.1, touch the system's RabbitMQ service or an epmd it did
not start, or signal a process it did not start.

Imported as `rabbit` by the scripts in bench/ and by tests/broker.py (which puts bench/ on sys.path): it
needs the standard library only, so the tests load no benchmark code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
PACKAGE = "rabbitmq-server"
INSTALL = f"apt-get install -y {PACKAGE}"
AMQP1_PLUGIN = "rabbitmq_amqp1_0"
LOCALHOST = "127.0.0.1"
START_TIMEOUT = 120.0  # seconds until the AMQP port answers; about 6 s on an idle 2-core VM
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
STARTED = "Server startup complete"


class RabbitError(Exception):
    """The node could not start or stop; the message names the process and shows its output's end."""


@dataclass(frozen=True, slots=True)
class Node:
    pid: int  # the Erlang VM's
    host: str
    port: int  # AMQP 0-9-1, and AMQP 1.0 when its plugin is enabled


def missing() -> str | None:
    """Why no node can start here, with the next step, or None."""
    if RABBITMQ_SERVER.exists():
        return None
    return f"{RABBITMQ_SERVER} not found: install Debian's {PACKAGE} ({INSTALL})"


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on at the moment, on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _Process:
    """A process started here, its output in a file; stopped by its own PID."""

    def __init__(
        self, name: str, argv: Sequence[str], output: Path, env: Mapping[str, str], cpus: set[int] | None
    ) -> None:
        self.name = name
        self.output = output
        with output.open("wb") as sink:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
            )

    def failure(self, what: str) -> RabbitError:
        status = self.popen.poll()
        state = "still running" if status is None else f"exit status {status}"
        lines = self.output.read_text(errors="replace").splitlines()[-20:]
        tail = "\n".join(lines)
        return RabbitError(f"{self.name} (pid {self.popen.pid}, {state}): {what}\nits output's end:\n{tail}")

    def says(self, text: str) -> bool:
        return text in self.output.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Until `ready()`, while this process runs."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None:
                raise self.failure(f"exited before {what}")
            if time.monotonic() > deadline:
                raise self.failure(f"not {what} within {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def rabbitmq(
    name: str,
    *,
    plugins: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
) -> Iterator[Node]:
    """A node named `meshbus-<name>-<pid>@localhost` with only `plugins` enabled and `settings`
    (rabbitmq.conf keys) besides its listener on a free port of 127.0.0.1, on `cpus` when given; yielded
    once it has started and its AMQP port answers."""
    if (reason := missing()) is not None:
        raise RabbitError(reason)
    with tempfile.TemporaryDirectory(prefix=f"meshbus-{name}-rabbitmq-") as scratch:
        base = Path(scratch)
        epmd_port, amqp_port, dist_port = free_ports(3)
        config = {"listeners.tcp.1": f"{LOCALHOST}:{amqp_port}", **(settings or {})}
        (base / "rabbitmq.conf").write_text("".join(f"{key} = {value}\n" for key, value in config.items()))
        (base / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        (base / "rabbitmq-env.conf").write_text("")
        environment = {
            "HOME": scratch,  # the Erlang cookie goes there
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": LOCALHOST,
            "RABBITMQ_NODENAME": f"meshbus-{name}-{os.getpid()}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": LOCALHOST,
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_LOGS": "-",
            # The script then execs the Erlang VM instead of running it as a child and relaying signals to
            # it: the PID started here is the node's, so SIGKILL cannot leave an orphaned node behind.
            "RUNNING_UNDER_SYSTEMD": "true",
        }
        # An epmd of its own, answering before the node starts: a node finding none starts a daemon that
        # outlives it.
        epmd_argv = ["epmd", "-port", str(epmd_port), "-address", LOCALHOST]
        epmd = _Process("epmd", epmd_argv, base / "epmd.out", {}, cpus)
        try:
            epmd.wait_until(lambda: _answers(epmd_port), f"answering on port {epmd_port}", START_TIMEOUT)
            server = _Process("rabbitmq-server", [str(RABBITMQ_SERVER)], base / "node.out", environment, cpus)
            try:
                # The listener opens a moment before the plugins have started: wait for both.
                server.wait_until(
                    lambda: server.says(STARTED) and _answers(amqp_port),
                    f"started and answering on port {amqp_port}",
                    START_TIMEOUT,
                )
                yield Node(server.popen.pid, LOCALHOST, amqp_port)
            finally:
                status = server.stop(STOP_GRACE)
                if status != 0:
                    print(
                        f"warning: rabbitmq-server pid {server.popen.pid} exited with {status}",
                        file=sys.stderr,
                    )
        finally:
            epmd.stop(STOP_GRACE)
