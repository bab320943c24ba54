"""Router benchmark: one-way throughput, RPC round trips, idle-connection memory and CPU per message.

Owns: building the C load clients (bench/loadclient.c -> bench/bin/), starting `meshbus router` and the
clients as subprocesses, and printing one line per figure: `name value unit`, followed by the same-run
peer's figure and the ratio where a peer runs here (the direct client-to-client ceiling, no router).
Must not: install anything, or signal any process it did not start (it stops its own by PID).

Run: .venv/bin/python bench/router_bench.py [--quick] [--messages N] [--direct-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "loadclient.c"
CLIENT = ROOT / "bench" / "bin" / "loadclient"
ROUTER = ROOT / ".venv" / "bin" / "meshbus"
HEADERS_PACKAGE = "libqpid-proton11-dev"
# Debian's libqpid-proton11-dev ships only the combined library's link name (libqpid-proton.so, as its
# pkg-config file says); the core and proactor libraries it contains have no unversioned .so there.
LINK_FLAGS = ["-lqpid-proton"]
LOCALHOST = "127.0.0.1"
ONE_WAY_ADDRESS = "bench/oneway"
RPC_ADDRESS = "bench/rpc"
LISTENING = re.compile(r"listening on (\S+:\d+)")
# The router runs on one core of its own and the load clients on the others, as the peers' figures were
# measured ("at one core"); without that, figures swing by a third as the scheduler mixes them.
# MESHBUS_BENCH_UNPINNED=1 leaves every process on every CPU, to check that a ratio is not the placement's.
CPUS = sorted(os.sched_getaffinity(0))
UNPINNED = os.environ.get("MESHBUS_BENCH_UNPINNED") == "1"
ROUTER_CPUS = set(CPUS) if UNPINNED else set(CPUS[-1:])
CLIENT_CPUS = set(CPUS) if UNPINNED else set(CPUS[:-1]) or ROUTER_CPUS


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and what to look at."""


def build_client() -> Path:
    """Compiles the load clients when the source is newer than the binary."""
    if CLIENT.exists() and CLIENT.stat().st_mtime >= SOURCE.stat().st_mtime:
        return CLIENT
    CLIENT.parent.mkdir(exist_ok=True)
    partial = CLIENT.with_suffix(".partial")
    command = ["cc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(partial), str(SOURCE), *LINK_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        if "proton/" in result.stderr or "-lqpid-proton" in result.stderr:
            raise BenchError(
                f"proton's C headers or library are missing: install Debian's {HEADERS_PACKAGE} "
                f"(apt-get install -y {HEADERS_PACKAGE}) and run the benchmark again\n{result.stderr}"
            )
        raise BenchError(f"compiling {SOURCE} failed: {shlex.join(command)}\n{result.stderr}")
    partial.replace(CLIENT)
    return CLIENT


class _Lines:
    """Collects a child's output stream on a thread, so its pipe never fills, and lets callers wait for
    a line."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: list[str] = []
        self._seen = 0
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def expect(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str] | None:
        """The first match among lines not yet looked at; None at end of stream or deadline."""
        with self._changed:
            while True:
                while self._seen < len(self._lines):
                    self._seen += 1
                    match = pattern.search(self._lines[self._seen - 1])
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._changed.wait(timeout=remaining)

    @property
    def closed(self) -> bool:
        with self._changed:
            return self._closed

    def tail(self, count: int = 20) -> str:
        with self._changed:
            return "\n".join(self._lines[-count:])

    def join(self) -> None:
        self._thread.join(timeout=5)


class Child:
    """A process this benchmark started; stopped by its own PID, never by name."""

    def __init__(self, name: str, argv: Sequence[str], cpus: set[int], *, hold_stdin: bool = False) -> None:
        self.name = name
        # A router keeps its default store under XDG_STATE_HOME: one of its own, gone with it, so that no
        # benchmark run sees another's stored messages or its store's lock.
        self._state = tempfile.TemporaryDirectory(prefix="meshbus-bench-state-")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if hold_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "XDG_STATE_HOME": self._state.name},
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self.stdout = _Lines(self.popen.stdout)
        self.stderr = _Lines(self.popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def failure(self, what: str) -> BenchError:
        status = self.popen.poll()
        state = "still running" if status is None else f"exit status {status}"
        return BenchError(f"{self.name} (pid {self.pid}, {state}): {what}\nits stderr:\n{self.stderr.tail()}")

    def expect(self, pattern: str, timeout: float, *, on_stderr: bool = False) -> re.Match[str]:
        stream = self.stderr if on_stderr else self.stdout
        match = stream.expect(re.compile(pattern), time.monotonic() + timeout)
        if match is None:
            if stream.closed:
                raise self.failure(f"its output ended without a line matching {pattern!r}")
            raise self.failure(f"no output matching {pattern!r} within {timeout:.0f} s")
        return match

    def result(self, timeout: float) -> dict[str, float]:
        """The `result k=v ...` line, once the client has exited cleanly."""
        line = self.expect(r"^result (.*)$", timeout)[1]
        self.wait(timeout)
        return {key: float(value) for key, value in (field.split("=", 1) for field in line.split())}

    def wait(self, timeout: float) -> None:
        try:
            status = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.failure(f"did not exit within {timeout:.0f} s") from None
        if status != 0:
            raise self.failure("failed")

    def close_stdin(self) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.close()

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.close_stdin()
        self.stdout.join()
        self.stderr.join()
        self._state.cleanup()
        return self.popen.returncode


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], *, cpus: set[int] = CLIENT_CPUS, hold_stdin: bool = False
) -> Iterator[Child]:
    child = Child(name, argv, cpus, hold_stdin=hold_stdin)
    try:
        yield child
    finally:
        child.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no VmRSS line")


def stop_on_sigterm() -> None:
    """Make SIGTERM end the benchmark as Ctrl-C does, through its `finally` blocks, which stop the routers
    and brokers it started: by default the signal ends the process at once and leaves them running. A
    child forked later keeps the default."""
    parent = os.getpid()

    def terminated(signum: int, frame: object) -> None:
        if os.getpid() != parent:  # a forked child: end as the signal ends it by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


def raise_file_limit(needed: int) -> None:
    """Raises RLIMIT_NOFILE for this process and the children it starts (router, idle holder)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: str
    peer: str | None = None
    peer_value: float | None = None
    runs: Sequence[float] = ()  # every run's value where `value` is their median

    def line(self) -> str:
        text = f"{self.name} {_number(self.value)} {self.unit}"
        if self.peer is not None and self.peer_value is not None:
            ratio = self.value / self.peer_value if self.peer_value else float("nan")
            text += f" {self.peer} {_number(self.peer_value)} {self.unit} ratio {ratio:.3f}"
        if len(self.runs) > 1:
            text += " (median of " + " ".join(_number(run) for run in self.runs) + ")"
        return text


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def report(figure: Figure) -> None:
    print(figure.line(), flush=True)


@dataclass(frozen=True, slots=True)
class Settings:
    messages: int
    body_size: int
    credit: int
    rpc_requests: int
    connections: int
    router_command: list[str]
    repeat: int  # runs of each throughput figure; this VM's figures vary by a quarter from run to run

    def timeout(self, count: int) -> float:
        """Generous bound for one client run: a router at 5,000 msg/s still finishes."""
        return 60.0 + count / 5000


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = str(build_client())

    def _client(self, role: str, *args: str | int) -> list[str]:
        return [self.client, role, *(str(arg) for arg in args)]

    def one_way(self, host_port: str | None, presettled: bool) -> float:
        """Messages per second from the sender's first message to the last accepted outcome (unsettled)
        or to the receiver's last message (pre-settled). host_port None: direct, the receiver listens."""
        count, timeout = self.settings.messages, self.settings.timeout(self.settings.messages)
        common: list[str | int] = ["-n", count, "-c", self.settings.credit, "-T", int(timeout)]
        if host_port is None:
            receiver_argv = self._client("recv", "-l", f"{LOCALHOST}:0", *common)
        else:
            receiver_argv = self._client("recv", "-a", host_port, "-t", ONE_WAY_ADDRESS, *common)
        with running("receiver", receiver_argv) as receiver:
            if host_port is None:
                target = receiver.expect(LISTENING.pattern, 10)[1]
            else:
                target = host_port
                receiver.expect("^ready", 10)
            sender_argv = self._client(
                "send", "-a", target, "-t", ONE_WAY_ADDRESS, "-s", self.settings.body_size, *common
            )
            if presettled:
                sender_argv.append("-p")
            with running("sender", sender_argv) as sender:
                sent = sender.result(timeout + 10)
                received = receiver.result(timeout + 10)
        if not presettled:
            if sent["accepted"] != count:
                raise BenchError(f"only {sent['accepted']:.0f} of {count} messages were accepted")
            return sent["rate"]
        return received["count"] / (received["end"] - sent["start"])

    def rpc(self, host_port: str, outstanding: int) -> tuple[float, float, float]:
        """Round trips per second, p50 and p99 latency in microseconds."""
        count = self.settings.rpc_requests
        timeout = self.settings.timeout(count * 4)
        common: list[str | int] = ["-a", host_port, "-t", RPC_ADDRESS, "-n", count, "-T", int(timeout)]
        server_argv = self._client("rpc-server", *common, "-c", max(outstanding * 2, 100))
        with running("rpc server", server_argv) as server:
            server.expect("^ready", 10)
            client_argv = self._client(
                "rpc-client", *common, "-o", outstanding, "-s", self.settings.body_size
            )
            with running("rpc client", client_argv) as client:
                result = client.result(timeout + 10)
            server.result(30)
        return result["rate"], result["p50_us"], result["p99_us"]

    def hold_idle(self, host_port: str, connections: int, router_pid: int) -> float:
        """Router RSS growth per connection (KiB) while `connections` idle connections are open."""
        timeout = 60 + connections / 20
        argv = self._client("idle", "-a", host_port, "-n", connections, "-T", int(timeout))
        before = rss_kib(router_pid)
        with running("idle holder", argv, hold_stdin=True) as holder:
            holder.expect("^ready", timeout + 10)
            time.sleep(1.0)  # let the router finish its per-connection work (logging, timers)
            after = rss_kib(router_pid)
            holder.close_stdin()
            holder.wait(30)
        return (after - before) / connections


@contextlib.contextmanager
def router(command: Sequence[str]) -> Iterator[tuple[Child, str]]:
    """A router listening on an ephemeral port; yields it and its HOST:PORT."""
    if not Path(command[0]).exists():
        raise BenchError(f"{command[0]} not found: install the project (pip install -e '.[test]') first")
    with running("router", [*command, "--listen", f"{LOCALHOST}:0"], cpus=ROUTER_CPUS) as child:
        host_port = child.expect(LISTENING.pattern, 30, on_stderr=True)[1]
        yield child, host_port
        status = child.stop()
        if status != 0:
            print(
                f"warning: router pid {child.pid} exited with {status} on SIGTERM (expected 0)",
                file=sys.stderr,
            )


def run_direct(bench: Bench) -> dict[str, float]:
    ceilings = {}
    for mode, presettled in (("unsettled", False), ("presettled", True)):
        runs = [bench.one_way(None, presettled) for _ in range(bench.settings.repeat)]
        ceilings[mode] = statistics.median(runs)
        report(Figure(f"oneway_{mode}_direct", ceilings[mode], "msg/s", runs=runs))
    return ceilings


def run_router(bench: Bench, ceilings: dict[str, float]) -> None:
    command = bench.settings.router_command
    for mode, presettled in (("unsettled", False), ("presettled", True)):
        rates, cpu_per_message = [], []
        with router(command) as (child, host_port):
            for _ in range(bench.settings.repeat):
                cpu_before = cpu_seconds(child.pid)
                rates.append(bench.one_way(host_port, presettled))
                cpu = cpu_seconds(child.pid) - cpu_before
                cpu_per_message.append(cpu / bench.settings.messages * 1e6)
        median = statistics.median(rates)
        report(Figure(f"oneway_{mode}", median, "msg/s", "direct", ceilings[mode], runs=rates))
        if not presettled:
            report(
                Figure("router_cpu_per_msg", statistics.median(cpu_per_message), "us", runs=cpu_per_message)
            )
    with tempfile.TemporaryDirectory() as scratch:
        # The default polls instead of sleeping while traffic is dense (busy_poll); this is without.
        sleeping = Path(scratch) / "no-busy-poll.toml"
        sleeping.write_text("[router]\nbusy_poll = 0\n")
        for outstanding, name, argv in (
            (1, "rpc_1_outstanding", command),
            (16, "rpc_16_outstanding", command),
            (16, "rpc_16_outstanding_no_busy_poll", [*command, "--config", str(sleeping)]),
        ):
            with router(argv) as (child, host_port):
                results = sorted(bench.rpc(host_port, outstanding) for _ in range(bench.settings.repeat))
            rate, p50, p99 = results[len(results) // 2]  # the run with the median rate
            report(Figure(name, rate, "rt/s", runs=[result[0] for result in results]))
            report(Figure(f"{name}_p50", p50, "us"))
            report(Figure(f"{name}_p99", p99, "us"))
    with router(command) as (child, host_port):
        bench.hold_idle(host_port, 10, child.pid)  # warm-up: first connections load code paths
        per_connection = bench.hold_idle(host_port, bench.settings.connections, child.pid)
    report(Figure(f"router_mem_per_idle_conn_at_{bench.settings.connections}", per_connection, "KiB"))


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, help="one-way messages per run (default 1,000,000)")
    parser.add_argument("--rpc-requests", type=int, help="round trips per RPC run (default 20,000)")
    parser.add_argument("--connections", type=int, help="idle connections held (default 1,000)")
    parser.add_argument("--body-size", type=int, default=100, help="message body bytes (default 100)")
    parser.add_argument("--credit", type=int, default=1000, help="receivers' credit window (default 1,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--direct-only", action="store_true", help="only the client ceiling, no router")
    parser.add_argument(
        "--router-command",
        default=shlex.join([str(ROUTER), "router"]),
        help="router command line, to which --listen HOST:0 is appended (default: the venv's meshbus router)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    settings = Settings(
        messages=args.messages or (20_000 if quick else 1_000_000),
        body_size=args.body_size,
        credit=args.credit,
        rpc_requests=args.rpc_requests or (500 if quick else 20_000),
        connections=args.connections or (100 if quick else 1000),
        router_command=shlex.split(args.router_command),
        repeat=1 if quick else max(1, args.repeat),
    )
    return settings, bool(args.direct_only)


def main(argv: Sequence[str] | None = None) -> int:
    settings, direct_only = parse_args(argv)
    stop_on_sigterm()
    print(f"# router on cpu {sorted(ROUTER_CPUS)}, load clients on cpu {sorted(CLIENT_CPUS)}", flush=True)
    try:
        raise_file_limit(settings.connections * 2 + 256)
        bench = Bench(settings)
        ceilings = run_direct(bench)
        if not direct_only:
            run_router(bench, ceilings)
    except BenchError as error:
        print(f"router_bench: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
