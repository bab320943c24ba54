"""SIGKILL of the middle router of a triangle under steady RPC load, and its return.

Triangle A, B, C with links A-B 1, B-C 1, A-C 10: calls from a client on A to a server on C take A-B-C.
Workers call and cast (at least once) without pause while B is killed; the path A-C takes over. Counted:
every call and cast started after A and C have rerouted succeeds; a call fails before that only if its
outcome is really unknown (its request was taken by the server and the reply was lost with B, so the
client waited for its time-out); every cast the server acknowledged has run there. Then B starts again,
rejoins by its own connectors, and the calls, still running, keep succeeding.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from meshbus.messaging import (
    MessagingTimeout,
    OutcomeUnknown,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from tests.mesh_routers.conftest import (
    WAIT,
    Mesh,
    Recorder,
    answered,
    neighbour_down,
    unreachable,
    url_of,
)

WORKERS = 4
TIMEOUT = 5.0  # seconds per call and cast: a lost reply costs this long
PER_PHASE = 100  # requests completed in each phase


@dataclass(frozen=True, slots=True)
class Result:
    n: int
    kind: str  # "call" or "cast"
    started: float  # time.monotonic()
    clock: float  # time.time() at the start, to compare with the routers' logs
    error: Exception | None


class Load:
    """Workers calling `echo` and casting `record` in turn, each request numbered, until stopped."""

    def __init__(self, client: RPCClient) -> None:
        self.client = client
        self.results: list[Result] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while not self._stopped.is_set():
            n = next(self._numbers)
            kind = "call" if n % 2 == 0 else "cast"
            started, clock = time.monotonic(), time.time()
            error: Exception | None = None
            try:
                if kind == "call":
                    assert self.client.call({}, "echo", n=n) == n
                else:
                    self.client.cast({}, "record", n=n)
            except Exception as failure:  # any failure is counted; the test judges it
                error = failure
            with self._lock:
                self.results.append(Result(n, kind, started, clock, error))

    def since(self, moment: float, until: float = float("inf")) -> list[Result]:
        with self._lock:
            return [result for result in self.results if moment <= result.started < until]

    def wait_for(self, count: int, moment: float) -> None:
        """Wait until `count` requests started after `moment` have completed."""
        deadline = time.monotonic() + WAIT + TIMEOUT
        while len(done := self.since(moment)) < count:
            assert time.monotonic() < deadline, f"only {len(done)} requests completed: {summary(done)}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(TIMEOUT + WAIT)


def summary(results: list[Result]) -> str:
    failed = [
        f"{r.kind} {r.n} at {datetime.fromtimestamp(r.clock).time()}: {type(r.error).__name__}: {r.error}"
        for r in results
        if r.error
    ]
    return f"{len(results)} requests, {len(failed)} failed: {failed[:10]}"


def test_sigkill_of_the_middle_router_reroutes_calls_and_it_rejoins(mesh: Mesh) -> None:
    mesh.start("A")
    mesh.start("C", to={"A": 10})
    mesh.start("B", to={"A": 1, "C": 1})  # B only connects: it can come back on another port
    mesh.converged()
    topic = f"failover-{uuid.uuid4().hex[:8]}"
    client_transport, server_transport = Transport(url_of(mesh["A"])), Transport(url_of(mesh["C"]))
    recorder = Recorder()
    server = RPCServer(server_transport, Target(topic=topic, server="s1"), [recorder])
    load: Load | None = None
    try:
        server.start()
        client = RPCClient(client_transport, Target(topic=topic), timeout=TIMEOUT)
        answered(client)
        load = Load(client)
        begin = time.monotonic()
        load.wait_for(PER_PHASE, begin)

        marks = mesh.marks()
        mesh["B"].kill()
        killed = time.monotonic()
        for router_id in "AC":
            mesh.expect(router_id, neighbour_down("B"), marks)
            mesh.expect(router_id, unreachable("B"), marks)
        rerouted = time.monotonic()
        load.wait_for(PER_PHASE, rerouted)

        marks = mesh.marks()
        restarted = time.monotonic()
        mesh.restart("B")
        mesh.joined("B", marks)
        rejoined = time.monotonic()
        load.wait_for(PER_PHASE, rejoined)
    finally:
        if load is not None:
            load.stop()
        server.stop()
        server.wait()
        client_transport.close()
        server_transport.close()
    assert load is not None

    phases = {
        "before the kill": load.since(begin, killed),
        "until A and C rerouted": load.since(killed, rerouted),
        "after the reroute": load.since(rerouted, restarted),
        "while B rejoined": load.since(restarted, rejoined),
        "after B rejoined": load.since(rejoined),
    }
    report = "; ".join(f"{phase}: {summary(results)}" for phase, results in phases.items())
    print(report)
    after_reroute = load.since(rerouted)
    assert all(r.error is None for r in after_reroute), f"a request failed after the reroute: {report}"
    around_kill = load.since(begin, rerouted)
    lost = [r for r in around_kill if r.error is not None and not outcome_unknown(r, recorder.runs.keys())]
    assert lost == [], f"failed though their outcome was known: {summary(lost)}"
    acknowledged = [r.n for r in load.results if r.kind == "cast" and r.error is None]
    assert recorder.missing(acknowledged) == set(), "casts acknowledged, then lost"


def outcome_unknown(result: Result, ran: Collection[int]) -> bool:
    """A call whose request the server took and ran, and whose reply never came: the client cannot tell
    whether it ran, so a time-out (or OutcomeUnknown) is the honest answer. Anything else is a loss."""
    timed_out = isinstance(result.error, MessagingTimeout) and "no reply" in str(result.error)
    return (
        result.kind == "call" and (timed_out or isinstance(result.error, OutcomeUnknown)) and result.n in ran
    )
