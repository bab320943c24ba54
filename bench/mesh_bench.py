"""Mesh benchmark (issue 5): throughput and RPC across 1, 2 and 3 routers, reroute time after a router's
death or silence, path computation for 1,000 routers, convergence of 20 router processes.

Owns: starting meshes of `meshbus router` processes (configuration files in a temporary directory, ports
chosen beforehand on 127.0.0.1, so every router of a mesh starts at once), probing them, and printing one
line per figure as router_bench.py does (`name value unit`, then the same-run peer or the issue's target
and the ratio). The load clients and their runs are router_bench.py's, with the sending and the receiving
client on different routers. Must not: install anything, or signal a process it did not start (it stops
its own by PID).

Run: .venv/bin/python bench/mesh_bench.py [--quick] [--only throughput|reroute|paths|converge]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from proton import Message

from meshbus.amqp.client import ClientConnection, Host, IncomingMessage, Outcome
from meshbus.mesh.path import GraphView, compute_paths
from router_bench import (
    CLIENT_CPUS,
    CPUS,
    LOCALHOST,
    ROUTER,
    ROUTER_CPUS,
    Bench,
    BenchError,
    Child,
    Figure,
    Settings,
    report,
    stop_on_sigterm,
)

SECTIONS = ("throughput", "reroute", "paths", "converge")
START_TIMEOUT = 30.0  # seconds for a mesh's routers to start and converge (20 routers share 2 cores)
PROBE_ADDRESS = "bench/probe"
PROBE_INTERVAL = 0.005  # seconds between probes, as Qpid Dispatch was measured here
REROUTE_TIMEOUT = 15.0  # seconds to wait for the first rerouted probe
# Issue 5's targets.
KILL_TARGET_MS = 500.0
SILENCE_TARGET_MS = 2000.0
PATHS_TARGET_MS = 100.0


@dataclass(frozen=True, slots=True, order=True)
class Link:
    """An inter-router link: router `connects` has a connector to router `listens`."""

    listens: str
    connects: str
    cost: int = 1


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together while chosen, so they differ); the routers bind them
    a moment later."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


class Mesh:
    """Router processes by id, all started at once, each with a client and an inter-router listener."""

    def __init__(
        self,
        ids: Sequence[str],
        links: Sequence[Link],
        directory: Path,
        cpus: set[int],
    ) -> None:
        ports = iter(free_ports(2 * len(ids)))
        self.client = {router_id: f"{LOCALHOST}:{next(ports)}" for router_id in ids}
        self.inter_router = {router_id: next(ports) for router_id in ids}
        self.routers: dict[str, Child] = {}
        self.launched = time.monotonic()
        self._all_started: float | None = None
        try:
            for router_id in ids:
                path = directory / f"{router_id}.toml"
                path.write_text(self._config(router_id, links))
                argv = [str(ROUTER), "router", "--config", str(path)]
                self.routers[router_id] = Child(f"router {router_id}", argv, cpus)
        except BaseException:
            self.close()
            raise

    def _config(self, router_id: str, links: Sequence[Link]) -> str:
        """Default mesh timers; the listener for clients first."""
        host, port = self.client[router_id].split(":")
        lines = [f'[router]\nid = "{router_id}"\n']
        lines.append(f'[[listener]]\nhost = "{host}"\nport = {port}\n')
        lines.append(f'[[listener]]\nhost = "{LOCALHOST}"\nport = {self.inter_router[router_id]}\n')
        lines.append('role = "inter-router"\n')
        for link in links:
            if link.connects == router_id:
                lines.append(
                    f'[[connector]]\nhost = "{LOCALHOST}"\nport = {self.inter_router[link.listens]}\n'
                    f'role = "inter-router"\ncost = {link.cost}\n'
                )
        return "\n".join(lines)

    def started(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until every router has logged that it started (its listeners open); when the last did."""
        if self._all_started is None:
            deadline = time.monotonic() + timeout
            for child in self.routers.values():
                remaining = max(deadline - time.monotonic(), 0.01)
                child.expect(r"router \S+ started", remaining, on_stderr=True)
            self._all_started = time.monotonic()
        return self._all_started

    def converged(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until every router has started and logged every other one as reachable; when the last did
        (monotonic)."""
        deadline = time.monotonic() + timeout
        self.started(timeout)
        for router_id, child in self.routers.items():
            missing = set(self.routers) - {router_id}
            while missing:
                remaining = deadline - time.monotonic()
                found = child.expect(r"router (\S+) reachable \(", max(remaining, 0.01), on_stderr=True)
                missing.discard(found[1])
        return time.monotonic()

    def close(self) -> None:
        for child in self.routers.values():
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGCONT)  # a router stopped by the benchmark takes SIGTERM
            child.stop()


@contextlib.contextmanager
def mesh(ids: Sequence[str], links: Sequence[Link], *, cpus: set[int] = ROUTER_CPUS) -> Iterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as directory:
        started = Mesh(ids, links, Path(directory), cpus)
        try:
            yield started
        finally:
            started.close()


# -- throughput ---------------------------------------------------------------------------------------------


class Across(Bench):
    """router_bench's client runs with the clients on two routers: senders and RPC clients on `entry`,
    receivers and RPC servers on `exit`."""

    def __init__(self, settings: Settings, entry: str, exit: str) -> None:
        super().__init__(settings)
        self.entry, self.exit = entry, exit

    def _client(self, role: str, *args: str | int) -> list[str]:
        argv = super()._client(role, *args)
        argv[argv.index("-a") + 1] = self.exit if role in ("recv", "rpc-server") else self.entry
        return argv


def line_of(count: int) -> tuple[list[str], list[Link]]:
    ids = [f"R{n}" for n in range(1, count + 1)]
    return ids, [Link(ids[n - 1], ids[n]) for n in range(1, count)]


def run_throughput(settings: Settings) -> None:
    print(f"# routers on cpu {sorted(ROUTER_CPUS)} (all of a mesh's), load clients on {sorted(CLIENT_CPUS)}")
    single: dict[str, float] = {}
    for count in (1, 2, 3):
        ids, links = line_of(count)
        with mesh(ids, links) as routers:
            routers.converged()
            bench = Across(settings, routers.client[ids[0]], routers.client[ids[-1]])
            rates = [bench.one_way(bench.entry, presettled=False) for _ in range(settings.repeat)]
            rpcs = sorted(bench.rpc(bench.entry, 16) for _ in range(settings.repeat))
        suffix = "1_router" if count == 1 else f"{count}_routers"
        figures = {
            "oneway_unsettled": (statistics.median(rates), "msg/s", rates),
            "rpc_16_outstanding": (rpcs[len(rpcs) // 2][0], "rt/s", [rpc[0] for rpc in rpcs]),
        }
        for name, (value, unit, runs) in figures.items():
            if count == 1:
                single[name] = value
                report(Figure(f"{name}_{suffix}", value, unit, runs=runs))
            else:
                report(Figure(f"{name}_{suffix}", value, unit, "1_router", single[name], runs=runs))


# -- reroute ------------------------------------------------------------------------------------------------


def _probe(seq: int) -> bytes:
    encoded: bytes = Message(address=PROBE_ADDRESS, body=seq).encode()
    return encoded


def _seq(message: IncomingMessage) -> int:
    decoded = Message()
    decoded.decode(message.payload)
    body = decoded.body
    if not isinstance(body, int):
        raise BenchError(f"a probe with a {type(body).__name__} body")
    return body


def _ignore(outcome: asyncio.Future[Outcome]) -> None:
    """A probe's outcome does not matter (a released probe is not sent again); retrieve its error."""
    if not outcome.cancelled():
        outcome.exception()


async def reroute_gap(entry: str, exit: str, interrupt: Callable[[], None]) -> float:
    """Seconds from `interrupt()` to the arrival at `exit` of the first probe sent after it from `entry`,
    probes going every PROBE_INTERVAL."""
    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}
    arrived = 0
    interrupted_at = float("inf")
    rerouted: asyncio.Future[float] = loop.create_future()

    def take(message: IncomingMessage) -> None:
        nonlocal arrived
        now = time.monotonic()
        message.accept()
        arrived += 1
        if sent[_seq(message)] >= interrupted_at and not rerouted.done():
            rerouted.set_result(now)

    def host(host_port: str) -> list[Host]:
        name, port = host_port.split(":")
        return [Host(name, int(port))]

    consumer = ClientConnection(host(exit))
    producer = ClientConnection(host(entry))

    async def probe() -> None:
        due = time.monotonic()
        for seq in range(sys.maxsize):
            sent[seq] = time.monotonic()
            producer.send(PROBE_ADDRESS, _probe(seq)).add_done_callback(_ignore)
            due += PROBE_INTERVAL
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    prober = loop.create_task(probe())
    try:
        await consumer.receive(PROBE_ADDRESS, take, credit=1000).ready()
        deadline = time.monotonic() + START_TIMEOUT
        while arrived < 200:  # a second of probes through the cheap path, the mesh settled
            if time.monotonic() > deadline:
                raise BenchError(f"only {arrived} probes arrived from {entry} at {exit}")
            await asyncio.sleep(0.05)
        interrupted_at = time.monotonic()
        interrupt()
        try:
            return await asyncio.wait_for(rerouted, REROUTE_TIMEOUT) - interrupted_at
        except TimeoutError:
            raise BenchError(f"no probe rerouted within {REROUTE_TIMEOUT:.0f} s") from None
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        await producer.close()
        await consumer.close()


# The cheap path from A to C (cost 2) runs through B; the other is the direct link (cost 10).
TRIANGLE = (["A", "B", "C"], [Link("B", "A", 1), Link("B", "C", 1), Link("C", "A", 10)])


def run_reroute(repeat: int) -> None:
    print(
        "# triangle A-B 1, B-C 1, A-C 10 (default mesh timers); a probe every 5 ms from a client on A to a"
        " consumer on C; the gap from B's SIGKILL (SIGSTOP: silent) to the first probe sent after it arriving"
    )
    for name, signum, target in (
        ("reroute_after_sigkill", signal.SIGKILL, KILL_TARGET_MS),
        ("reroute_after_silence", signal.SIGSTOP, SILENCE_TARGET_MS),
    ):
        gaps = []
        for _ in range(repeat):
            with mesh(*TRIANGLE, cpus=set(CPUS)) as routers:
                routers.converged()
                interrupt = functools.partial(routers.routers["B"].popen.send_signal, signum)
                gap = asyncio.run(reroute_gap(routers.client["A"], routers.client["C"], interrupt))
                gaps.append(gap * 1000)
        report(Figure(name, statistics.median(gaps), "ms", "target", target, runs=gaps))


# -- path computation ---------------------------------------------------------------------------------------


def random_graph(size: int, extra_links: int, rng: random.Random) -> dict[str, dict[str, int]]:
    """A connected graph: a random tree (each router linked to an earlier one), plus random links; costs
    1 to 5, symmetric."""
    names = [f"r{n:04d}" for n in range(size)]
    graph: dict[str, dict[str, int]] = {name: {} for name in names}
    pairs = [(names[n], names[rng.randrange(n)]) for n in range(1, size)]
    pairs += [(rng.choice(names), rng.choice(names)) for _ in range(extra_links)]
    for a, b in pairs:
        if a != b:
            graph[a][b] = graph[b][a] = rng.randint(1, 5)
    return graph


def run_paths(samples: int, seed: int) -> None:
    rng = random.Random(seed)
    graph: GraphView = random_graph(1000, 1500, rng)
    degrees = {router: len(neighbours) for router, neighbours in graph.items()}
    busiest = max(degrees, key=degrees.__getitem__)
    routers = [*rng.sample(sorted(graph), samples), busiest]
    times = []
    for router in routers:
        started = time.perf_counter()
        paths = compute_paths(graph, router)
        times.append((time.perf_counter() - started) * 1000)
        if len(paths.routes) != len(graph) - 1:
            raise BenchError(f"{router} reaches {len(paths.routes)} of {len(graph) - 1} routers")
    mean = statistics.mean(degrees.values())
    print(
        f"# 1,000 routers, {sum(degrees.values()) // 2} links (mean degree {mean:.1f}, most"
        f" {degrees[busiest]}); a full recompute for one router: one Dijkstra plus one per neighbour"
    )
    report(Figure("paths_1000_routers_median", statistics.median(times), "ms", "target", PATHS_TARGET_MS))
    report(Figure("paths_1000_routers_max", max(times), "ms", "target", PATHS_TARGET_MS))
    report(Figure("paths_1000_routers_busiest", times[-1], "ms", "target", PATHS_TARGET_MS))


# -- convergence --------------------------------------------------------------------------------------------


def run_converge(count: int, seed: int, repeat: int) -> None:
    rng = random.Random(seed)
    ids = [f"R{n:02d}" for n in range(count)]
    links = {Link(ids[rng.randrange(n)], ids[n]) for n in range(1, count)}  # a tree: connected
    while len(links) < count + count // 2:
        a, b = rng.sample(ids, 2)
        if Link(b, a) not in links:
            links.add(Link(a, b))
    print(
        f"# {count} routers, {len(links)} links (seed {seed}), all launched at once on cpus {CPUS}; until"
        " each has logged every other one reachable"
    )
    from_launch, after_started = [], []
    for _ in range(repeat):
        with mesh(ids, sorted(links), cpus=set(CPUS)) as routers:
            all_started = routers.started()
            converged = routers.converged(START_TIMEOUT * 2)
        from_launch.append(converged - routers.launched)
        after_started.append(converged - all_started)
    name = f"converge_{count}_routers"
    report(Figure(f"{name}_from_launch", statistics.median(from_launch), "s", runs=from_launch))
    report(Figure(f"{name}_after_all_started", statistics.median(after_started), "s", runs=after_started))


@dataclass(frozen=True, slots=True)
class Options:
    settings: Settings  # for the throughput runs (router_bench's)
    sections: list[str]
    path_samples: int  # routers whose routes are computed, besides the busiest
    routers: int  # for `converge`
    seed: int


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--messages", type=int, help="one-way messages per run (default 200,000)")
    parser.add_argument("--rpc-requests", type=int, help="round trips per RPC run (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--routers", type=int, default=20, help="routers for `converge` (default 20)")
    parser.add_argument("--seed", type=int, default=20, help="of the random graphs (default 20)")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    settings = Settings(
        messages=args.messages or (20_000 if quick else 200_000),
        body_size=100,
        credit=1000,
        rpc_requests=args.rpc_requests or (500 if quick else 20_000),
        connections=0,
        router_command=[str(ROUTER), "router"],
        repeat=1 if quick else max(1, args.repeat),
    )
    return Options(settings, args.only or list(SECTIONS), 10 if quick else 50, args.routers, args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    stop_on_sigterm()
    print(f"# {shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}", flush=True)
    try:
        if "throughput" in options.sections:
            run_throughput(options.settings)
        if "reroute" in options.sections:
            run_reroute(options.settings.repeat)
        if "paths" in options.sections:
            run_paths(options.path_samples, options.seed)
        if "converge" in options.sections:
            run_converge(options.routers, options.seed, options.settings.repeat)
    except BenchError as error:
        print(f"mesh_bench: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
