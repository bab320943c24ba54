"""What one operation costs each process: CPU and context switches per call (cast, notification) of the
client, the server and the router, for meshbus.messaging's blocking and asyncio faces in every pairing (and,
asked for, oslo.messaging with the meshbus plugin).

Owns: a `meshbus router`, an RPC server (with its notification listener) and a load client, each in a process
of its own and placed as messaging_bench.py places them (client and server on the first CPU, the router on
the last); sampling their CPU time (/proc/<pid>/stat) and context switches (/proc/<pid>/task/*/status)
during the client's measured window; one line per figure.
Must not: install anything, listen beyond 127.0.0.1, or signal a process it did not start.

Where this VM's throughput moves by a quarter from minute to minute, cost per operation moves less, and
`--rounds` interleaves the pairings so that each round compares them in the same minutes.

Run: .venv/bin/python bench/cost_bench.py [--op calls|casts|notifications] [--concurrency 16]
     [--client blocking|asyncio|oslo_meshbus] [--server ...] [--seconds 4] [--rounds 1]
     [--router-config FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from messaging_bench import Control, Job, Worker, open_stack, serve, serving
from router_bench import ROUTER, BenchError, Figure, report, router, stop_on_sigterm

FACES = ("blocking", "asyncio")  # paired by default; oslo_meshbus (oslo.messaging with the plugin) on demand
CHOICES = (*FACES, "oslo_meshbus")
SAMPLE_EVERY = 0.02  # seconds between samples of the server's and the router's counters
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time


@dataclass(frozen=True, slots=True)
class Usage:
    cpu: float  # seconds, user + system, all threads
    voluntary: int  # context switches, all threads
    involuntary: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu - other.cpu, self.voluntary - other.voluntary, self.involuntary - other.involuntary
        )


@dataclass(frozen=True, slots=True)
class Window:
    """The client's measured run: operations, when (time.monotonic, the same clock in every process), and
    the client's own usage over it."""

    count: int
    began: float
    ended: float
    usage: Usage


def measure_window(control: Control, face: str, url: str, job: Job) -> Window:
    """In the client process: a warm-up run, then the measured one."""
    stack = open_stack(face, url)
    try:
        stack.run(job.kind, job.concurrency, job.warmup)
        before, began = _own_usage(), time.monotonic()
        run = stack.run(job.kind, job.concurrency, job.seconds)
        ended, after = time.monotonic(), _own_usage()
        return Window(run.count, began, ended, after - before)
    finally:
        stack.close()


def _own_usage() -> Usage:
    own = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return Usage(own.ru_utime + own.ru_stime, own.ru_nvcsw, own.ru_nivcsw)


def usage_of(pid: int) -> Usage:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    voluntary = involuntary = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for line in lines:
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return Usage(ticks / CLOCK_TICKS, voluntary, involuntary)


class Sampler:
    """Samples processes' usage every SAMPLE_EVERY seconds in a thread, until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, Usage]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.samples.append((now, {name: usage_of(pid) for name, pid in self.pids.items()}))
            self._stop.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, began: float, ended: float) -> dict[str, Usage]:
        """Each process's usage from the sample nearest `began` to the one nearest `ended`."""
        if not self.samples:
            raise BenchError("no sample of the server and router was taken")
        first = min(self.samples, key=lambda sample: abs(sample[0] - began))[1]
        last = min(self.samples, key=lambda sample: abs(sample[0] - ended))[1]
        return {name: last[name] - first[name] for name in self.pids}


def measure(client: str, server: str, job: Job, url: str, router_pid: int) -> None:
    name = f"cost_{job.kind}_{job.concurrency}_{client}_client_{server}_server"
    with serving(f"{server} server", 120, serve, server, url) as server_process:
        assert server_process.process.pid is not None
        sampler = Sampler({"server": server_process.process.pid, "router": router_pid})
        timeout = 2 * (job.seconds + job.warmup) + 120
        worker = Worker(f"{client} client", measure_window, client, url, job)
        try:
            window: Window = worker.receive("result", timeout)
        finally:
            worker.stop()
            sampler.stop()
    if not window.count:
        raise BenchError(f"{name}: the client completed no {job.kind}")
    usages = {"client": window.usage, **sampler.between(window.began, window.ended)}
    report(Figure(f"{name}_rate", window.count / (window.ended - window.began), f"{job.kind}/s"))
    for process, usage in usages.items():
        report(Figure(f"{name}_{process}_cpu_per_op", usage.cpu / window.count * 1e6, "us"))
        if process != "router":  # one thread: its switches are its wake-ups, not a hand-off's cost
            switches = (usage.voluntary + usage.involuntary) / window.count
            report(Figure(f"{name}_{process}_switches_per_op", switches, ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--op", choices=["calls", "casts", "notifications"], default="calls")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (tasks); default 16")
    parser.add_argument("--client", choices=CHOICES, help="only this client (default: both faces)")
    parser.add_argument("--server", choices=CHOICES, help="only this server (default: both faces)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per pairing")
    parser.add_argument("--rounds", type=int, default=1, help="times each pairing runs, interleaved")
    parser.add_argument("--router-config", help="the router's configuration file (default: none)")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    job = Job(args.op, args.concurrency, args.seconds, warmup=1.0)
    clients = [args.client] if args.client else list(FACES)
    servers = [args.server] if args.server else list(FACES)
    try:
        config = ["--config", args.router_config] if args.router_config else []
        with router([str(ROUTER), "router", *config]) as (child, host_port):
            for round_ in range(args.rounds):
                if args.rounds > 1:
                    print(f"# round {round_ + 1}", flush=True)
                for client in clients:
                    for server in servers:
                        measure(client, server, job, f"meshbus://{host_port}/", child.pid)
    except BenchError as error:
        print(f"cost_bench: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
