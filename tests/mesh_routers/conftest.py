"""Meshes of real router processes, for the mesh's integration tests (issue 5).

1. `mesh` starts routers by id through the `router` fixture (so their logs join a failing test's report and
   they are stopped after it). Each router has a client listener first (`Router.port` is the clients'),
   then an inter-router listener; `mesh.start("B", to={"A": 1})` gives B a connector to A's inter-router
   listener at cost 1, so a router connects only to routers started before it. `mesh.converged()` waits
   until every running router has logged every other one as reachable, `mesh.joined(id)` until one router
   and the others have; addresses follow within tens of milliseconds, so clients retry their first call
   (`answered`).
2. `namespace_pair` makes two network namespaces joined by a veth pair (`ip netns`), for partitions: `cut()`
   takes the link down (both ends go silent, sockets stay open), `heal()` brings it back. It skips the test
   where namespaces are not available or not permitted, and deletes them afterwards. `Namespace.run(f)`
   calls `f` in a thread inside the namespace: routers and transports started there, and the threads
   they start, live in it (a thread's network namespace is inherited by what it starts).
3. `Recorder` is an RPC endpoint that records every request it ran, so tests can count what got lost.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from meshbus.messaging import MessageUndeliverable, RPCClient
from tests.conftest import DEFAULT_ADDRESSES, START_TIMEOUT, Config, Router

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
# A silent neighbour is dead after 2 s (default 1.5 s after 0.5 s hellos): eight missed hellos leave room
# for a machine busy with the rest of the suite, and a partition test still takes seconds.
TIMERS = {"hello_interval": 0.25, "hello_timeout": 2.0}
WAIT = 20.0  # seconds for something that should happen within a second or two (convergence, a reroute)
INTER_ROUTER_LISTENER = re.compile(r"listening on (\S+):(\d+) \(role inter-router")

Marks = Mapping[str, tuple[Router, int]]  # router id -> (the process, a position in its log)


class Mesh:
    """Routers by id, and the inter-router links between them (see the module docstring)."""

    def __init__(self, start: Callable[[Config], Router]) -> None:
        self._start = start
        self.routers: dict[str, Router] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._namespaces: dict[str, Namespace | None] = {}
        self._inter_router: dict[str, tuple[str, int]] = {}
        self._targets: set[str] = set()  # routers whose inter-router port another router's connector uses

    def __getitem__(self, router_id: str) -> Router:
        return self.routers[router_id]

    def start(
        self,
        router_id: str,
        to: Mapping[str, int] | None = None,
        *,
        host: str = LOCALHOST,
        namespace: Namespace | None = None,
    ) -> Router:
        """Start router `router_id`, its inter-router listener on `host`, connected to the routers in `to`
        (id -> the link's cost: the larger of the two ends' counts, and listeners keep the default 1)."""
        to = to or {}
        self._targets.update(to)
        self._configs[router_id] = {
            "router": {"id": router_id},
            "mesh": TIMERS,
            "listener": [{}, {"host": host, "role": "inter-router"}],
            "connector": [
                {"host": peer_host, "port": peer_port, "role": "inter-router", "cost": cost}
                for peer, cost in to.items()
                for peer_host, peer_port in [self._inter_router[peer]]
            ],
            "address": DEFAULT_ADDRESSES,
        }
        self._namespaces[router_id] = namespace
        return self._launch(router_id)

    def restart(self, router_id: str) -> Router:
        """Start a router again with its configuration (after it was killed). Its inter-router port changes,
        so only a router no other one connects to can come back this way."""
        assert router_id not in self._targets, f"routers connect to {router_id}'s old port: restart another"
        assert self.routers[router_id].process.poll() is not None, f"router {router_id} is still running"
        return self._launch(router_id)

    def _launch(self, router_id: str) -> Router:
        config, namespace = self._configs[router_id], self._namespaces[router_id]
        started = self._start(config) if namespace is None else namespace.run(self._start, config)
        found = started.wait_for_log(INTER_ROUTER_LISTENER, START_TIMEOUT)
        if found is None:
            raise AssertionError(f"router {router_id} logged no inter-router listener:\n{started.log()}")
        self.routers[router_id] = started
        self._inter_router[router_id] = (found.group(1), int(found.group(2)))
        return started

    def marks(self) -> Marks:
        """Every router's position in its log, for `expect(..., since=)` and `converged(since=)`; a router
        restarted later is read from the start of its new log."""
        return {router_id: (router, router.mark()) for router_id, router in self.routers.items()}

    def expect(self, router_id: str, pattern: str, since: Marks | None = None) -> None:
        """Wait for router `router_id` to log a line matching `pattern` (after its mark in `since`)."""
        router = self.routers[router_id]
        marked, position = (since or {}).get(router_id, (router, 0))
        start = position if marked is router else 0
        if router.wait_for_log(pattern, WAIT, start) is None:
            raise AssertionError(
                f"router {router_id} logged nothing matching {pattern!r} within {WAIT} s; since then:\n"
                f"{router.log(start)}"
            )

    def converged(self, since: Marks | None = None) -> None:
        """Wait until each running router has logged every other running one as reachable."""
        for router_id in self._running():
            self.joined(router_id, since)

    def joined(self, router_id: str, since: Marks | None = None) -> None:
        """Wait until router `router_id` and every other running router have logged each other reachable."""
        for other in self._running():
            if other != router_id:
                self.expect(router_id, reachable(other), since)
                self.expect(other, reachable(router_id), since)

    def _running(self) -> list[str]:
        return [router_id for router_id, router in self.routers.items() if router.process.poll() is None]


def reachable(router_id: str) -> str:
    return rf"router {re.escape(router_id)} reachable \("


def unreachable(router_id: str) -> str:
    return rf"router {re.escape(router_id)} unreachable\b"


def neighbour_down(router_id: str) -> str:
    return rf"neighbour {re.escape(router_id)} down\b"


def neighbour_up(router_id: str) -> str:
    return rf"neighbour {re.escape(router_id)} up\b"


@pytest.fixture
def mesh(router: Callable[[Config], Router]) -> Mesh:
    return Mesh(router)


def url_of(router: Router) -> str:
    return f"meshbus://{router.host}:{router.port}/"


# -- RPC -------------------------------------------------------------------------------------------------


class Recorder:
    """An RPC endpoint that records each request it runs (`n` numbers them), from any thread."""

    def __init__(self) -> None:
        self.runs: Counter[int] = Counter()
        self._changed = threading.Condition()

    def echo(self, ctxt: Any, n: int) -> int:
        self._record(n)
        return n

    def record(self, ctxt: Any, n: int) -> None:
        self._record(n)

    def ping(self, ctxt: Any) -> str:
        return "pong"

    def _record(self, n: int) -> None:
        with self._changed:
            self.runs[n] += 1
            self._changed.notify_all()

    def missing(self, numbers: Iterable[int], timeout: float = WAIT) -> set[int]:
        """Which of `numbers` have not run, once all have or `timeout` passed (a server acknowledges a
        request before its endpoint runs)."""
        wanted = set(numbers)
        with self._changed:
            self._changed.wait_for(lambda: wanted <= self.runs.keys(), timeout)
            return wanted - self.runs.keys()


def answered(client: RPCClient) -> None:
    """Call `ping` until a server answers: the mesh has converged, its addresses may still be on their way
    (until then the call fails fast, nobody serving its address yet)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            client.call({}, "ping")
            return
        except MessageUndeliverable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- network namespaces ----------------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(name: str) -> None:
    """Move the calling thread into network namespace `name` (setns(2); Python 3.11 has no os.setns)."""
    descriptor = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(descriptor, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into network namespace {name}: {os.strerror(error)}")
    finally:
        os.close(descriptor)


class Namespace:
    """A network namespace of the test's, with a thread inside it to start things there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_enter, initargs=(name,)
        )

    def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`, called in the namespace."""
        return self._thread.submit(work, *args).result(WAIT * 3)

    def close(self) -> None:
        self._thread.shutdown()


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass(slots=True)
class NamespacePair:
    """Two namespaces joined by a veth pair named `VETH` at both ends, on a private /30."""

    left: Namespace
    right: Namespace
    left_address: str
    right_address: str

    def cut(self) -> None:
        """A silent partition: the link goes down, nothing passes, no socket learns of it."""
        ip("-n", self.left.name, "link", "set", VETH, "down")

    def heal(self) -> None:
        ip("-n", self.left.name, "link", "set", VETH, "up")


VETH = "mesh0"  # each end lives in a namespace of its own: the name cannot clash with anything


@pytest.fixture
def namespace_pair() -> Iterator[NamespacePair]:
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's ip command, which is not installed")
    names = [f"meshbus-test-{os.getpid()}-{side}" for side in ("left", "right")]
    made: list[str] = []
    namespaces: list[Namespace] = []
    try:
        for name in names:
            try:
                ip("netns", "add", name)
            except RuntimeError as error:
                pytest.skip(f"cannot make network namespaces here (root and CAP_SYS_ADMIN needed): {error}")
            made.append(name)
        left, right = names
        ip("link", "add", VETH, "netns", left, "type", "veth", "peer", "name", VETH, "netns", right)
        addresses = ["10.200.0.1", "10.200.0.2"]
        for name, address in zip(names, addresses, strict=True):
            ip("-n", name, "addr", "add", f"{address}/30", "dev", VETH)
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", VETH, "up")
        namespaces = [Namespace(name) for name in names]
        yield NamespacePair(namespaces[0], namespaces[1], *addresses)
    finally:
        for namespace in namespaces:
            namespace.close()
        for name in made:  # the veth pair goes with its namespaces
            ip("netns", "del", name)
