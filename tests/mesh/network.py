"""A simulated network of MeshNode objects: messages travel in memory, time is simulated.

1. `Network` owns the clock (`now`) and a queue of timed actions: message deliveries and the nodes' ticks
   (each node is ticked at its own `next_tick()`). `run(seconds)` plays them in order, so a convergence of
   seconds takes milliseconds.
2. Each direction of a link is FIFO, with a random latency from a seeded `random.Random`; the `drop`
   predicate may lose chosen messages. Messages go through `to_dict()` and `decode()`, as on the wire
   (unless `wire=False`, for speed).
3. Failures: `disconnect` (the connection closes: both ends are told), `cut`/`heal` (nothing passes
   meanwhile, nobody is told), `kill` (the process dies: its neighbours are told), `silence` (it hangs:
   nothing in or out, nobody is told), `restart` (killed, then back with a new instance on fresh connections).
4. `expected_routes` is an oracle, independent of path.py, and `check_converged` compares every surviving
   router's tables, multicast trees and address view with it.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from heapq import heappop, heappush

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import Event, Link
from meshbus.mesh.messages import Message, decode
from meshbus.mesh.node import MeshNode, RoutingTable

Graph = dict[str, dict[str, int]]


@dataclass(frozen=True)
class End:
    """One end of a simulated link: the `Link` handle its router knows the link by."""

    link: int
    side: int

    def __repr__(self) -> str:
        return f"L{self.link}{'ab'[self.side]}"


@dataclass(eq=False)
class SimLink:
    id: int
    routers: tuple[SimRouter, SimRouter]
    costs: list[int]  # each end's cost
    up: bool = True
    cut: bool = False
    last_arrival: list[float] = field(default_factory=lambda: [0.0, 0.0])  # per direction, for FIFO order

    def end(self, side: int) -> End:
        return End(self.id, side)

    def passes(self) -> bool:
        return self.up and not self.cut


class SimRouter:
    """One router: its MeshNode, and the Outbox that records what the node tells its edge."""

    def __init__(self, network: Network, name: str, router_id: str, instance: int) -> None:
        self.network = network
        self.name = name
        self.router_id = router_id
        self.alive = True
        self.silent = False
        self.ends: dict[End, SimLink] = {}
        self.local: set[str] = set()
        self.addresses: dict[str, frozenset[str]] = {}
        self.events: list[Event] = []
        self.tick_at = float("inf")
        self.node = MeshNode(router_id, instance, network.config, self, random.Random(network.rng.random()))
        self.table: RoutingTable = self.node.table

    def __repr__(self) -> str:
        return f"<router {self.name} ({self.router_id})>"

    @property
    def running(self) -> bool:
        return self.alive and not self.silent

    # Outbox
    def send(self, link: Link, message: Message) -> None:
        self.network.carry(self, link, message)

    def routes_changed(self, table: RoutingTable) -> None:
        self.table = table

    def addresses_changed(self, changes: Mapping[str, frozenset[str]]) -> None:
        for address, routers in changes.items():
            if routers:
                self.addresses[address] = routers
            else:
                del self.addresses[address]

    def report(self, event: Event) -> None:
        self.events.append(event)


class Network:
    def __init__(
        self,
        *,
        seed: int = 0,
        config: MeshConfig | None = None,
        latency: tuple[float, float] = (0.0005, 0.002),
        wire: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or MeshConfig()
        self.latency = latency
        self.wire = wire
        self.now = 0.0
        self.routers: dict[str, SimRouter] = {}
        self.links: list[SimLink] = []
        self.drop: Callable[[SimRouter, SimRouter, Message], bool] = lambda sender, receiver, message: False
        self.sent: Counter[str] = Counter()  # messages sent, by op
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._instances = itertools.count(1)

    # -- building and breaking -----------------------------------------------------------------------

    def add(self, name: str, *, router_id: str | None = None, addresses: tuple[str, ...] = ()) -> SimRouter:
        router = SimRouter(self, name, router_id or name, next(self._instances))
        self.routers[name] = router
        for address in addresses:
            self.add_address(name, address)
        return router

    def connect(self, a: str, b: str, cost: int = 1, cost_b: int | None = None) -> SimLink:
        link = SimLink(
            len(self.links), (self.routers[a], self.routers[b]), [cost, cost if cost_b is None else cost_b]
        )
        self.links.append(link)
        for side, router in enumerate(link.routers):
            router.ends[link.end(side)] = link
            self._call(router, router.node.link_up, link.end(side), link.costs[side])
        return link

    def set_cost(self, link: SimLink, cost: int, cost_b: int | None = None) -> None:
        link.costs = [cost, cost if cost_b is None else cost_b]
        for side, router in enumerate(link.routers):
            self._call(router, router.node.link_cost, link.end(side), link.costs[side])

    def disconnect(self, link: SimLink) -> None:
        if not link.up:
            return
        link.up = False
        for side, router in enumerate(link.routers):
            self._call(router, router.node.link_down, link.end(side))

    def cut(self, link: SimLink) -> None:
        link.cut = True

    def heal(self, link: SimLink) -> None:
        link.cut = False

    def kill(self, name: str) -> None:
        router = self.routers[name]
        router.alive = False
        for link in set(router.ends.values()):
            self.disconnect(link)

    def silence(self, name: str) -> None:
        self.routers[name].silent = True

    def restart(self, name: str) -> SimRouter:
        """Kill the router and start a new process with the same id, connected as before to the living."""
        old = self.routers[name]
        peers = [
            (link.routers[1 - end.side].name, link.costs[end.side], link.costs[1 - end.side])
            for end, link in old.ends.items()
            if link.up
        ]
        self.kill(name)
        new = self.add(name, router_id=old.router_id, addresses=tuple(sorted(old.local)))
        for peer, cost, cost_b in peers:
            if self.routers[peer].alive:
                self.connect(name, peer, cost, cost_b)
        return new

    def add_address(self, name: str, address: str) -> None:
        self.routers[name].local.add(address)
        router = self.routers[name]
        self._call(router, router.node.local_address_added, address)

    def remove_address(self, name: str, address: str) -> None:
        self.routers[name].local.discard(address)
        router = self.routers[name]
        self._call(router, router.node.local_address_removed, address)

    # -- time ----------------------------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self._queue and self._queue[0][0] <= end:
            at, _, action = heappop(self._queue)
            self.now = at
            action()
        self.now = end

    def carry(self, sender: SimRouter, link_end: Link, message: Message) -> None:
        assert isinstance(link_end, End)
        link = sender.ends[link_end]
        assert link.up, f"{sender} sent {message} on closed link {link_end!r}"
        self.sent[message.OP] += 1
        side = 1 - link_end.side
        receiver = link.routers[side]
        if not link.passes() or self.drop(sender, receiver, message):
            return
        arrival = max(self.now + self.rng.uniform(*self.latency), link.last_arrival[side])
        link.last_arrival[side] = arrival
        received = decode(message.to_dict()) if self.wire else message
        self._at(arrival, lambda: self._deliver(link, side, received))

    def _deliver(self, link: SimLink, side: int, message: Message) -> None:
        if link.passes():
            receiver = link.routers[side]
            self._call(receiver, receiver.node.handle, link.end(side), message)

    def _call(self, router: SimRouter, event: Callable[..., None], *args: object) -> None:
        """Pass an event (a method of its node) to a running router, then make sure it is ticked when it asks
        to be. Every event takes `now` last."""
        if not router.running:
            return
        event(*args, self.now)
        due = max(router.node.next_tick(), self.now)
        if due < router.tick_at:
            router.tick_at = due
            self._at(due, lambda: self._tick(router, due))

    def _tick(self, router: SimRouter, due: float) -> None:
        if router.tick_at != due or not router.running:
            return  # superseded by an earlier tick, or the router is gone
        router.tick_at = float("inf")
        self._call(router, router.node.tick)
        assert router.node.next_tick() > self.now, f"{router} still has work due after its tick"

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heappush(self._queue, (when, next(self._order), action))

    # -- what the mesh should have computed ----------------------------------------------------------

    def running(self) -> list[SimRouter]:
        return [router for router in self.routers.values() if router.running]

    def surviving_graph(self) -> Graph:
        """The links between running routers that pass messages, by router id. Like the mesh: each end uses
        its cheapest link to a neighbour, and the larger of the two ends' costs counts."""
        cheapest: dict[tuple[str, str], int] = {}
        for link in self.links:
            a, b = link.routers
            if link.passes() and a.running and b.running:
                for (near, far), cost in (((a, b), link.costs[0]), ((b, a), link.costs[1])):
                    key = (near.router_id, far.router_id)
                    cheapest[key] = min(cheapest.get(key, cost), cost)
        graph: Graph = {router.router_id: {} for router in self.running()}
        for (near_id, far_id), cost in cheapest.items():
            graph[near_id][far_id] = max(cost, cheapest[(far_id, near_id)])
        return graph


def distances(graph: Graph, source: str) -> dict[str, int]:
    """Plain Dijkstra (no next hops): the cost from source to every router it reaches."""
    done: dict[str, int] = {}
    heap = [(0, source)]
    while heap:
        cost, node = heappop(heap)
        if node not in done:
            done[node] = cost
            for neighbour, link_cost in graph[node].items():
                if neighbour not in done:
                    heappush(heap, (cost + link_cost, neighbour))
    return done


def expected_routes(graph: Graph) -> dict[str, dict[str, tuple[int, tuple[str, ...]]]]:
    """For every router, every other router it reaches: cost and all next hops on a lowest-cost path."""
    costs = {router: distances(graph, router) for router in graph}
    return {
        router: {
            far: (
                cost,
                tuple(sorted(n for n, c in graph[router].items() if c + costs[n].get(far, -1) == cost)),
            )
            for far, cost in costs[router].items()
            if far != router
        }
        for router in graph
    }


def multicast_copies(tables: Mapping[str, RoutingTable], source: str) -> Counter[str]:
    """How many copies each router gets of a multicast message from `source`, forwarded by these tables."""
    copies: Counter[str] = Counter()
    pending = [source]
    while pending:
        router = pending.pop()
        for neighbour in tables[router].multicast.get(source, ()):
            copies[neighbour] += 1
            if copies[neighbour] == 1:
                pending.append(neighbour)
    return copies


def check_converged(network: Network) -> None:
    """Every running router's routes, multicast trees and remote addresses agree with the surviving graph."""
    graph = network.surviving_graph()
    expected = expected_routes(graph)
    routers = {router.router_id: router for router in network.running()}
    tables = {router_id: router.table for router_id, router in routers.items()}
    for router_id, router in routers.items():
        actual = {far: (route.cost, route.next_hops) for far, route in router.table.routes.items()}
        assert actual == expected[router_id], f"{router} routes"
        for neighbour, link in router.table.links.items():
            assert isinstance(link, End) and router.ends[link].routers[1 - link.side].router_id == neighbour
        wanted: dict[str, set[str]] = {}
        for far in expected[router_id]:
            for address in routers[far].local:
                wanted.setdefault(address, set()).add(far)
        assert router.addresses == {a: frozenset(r) for a, r in wanted.items()}, f"{router} addresses"
        copies = multicast_copies(tables, router_id)
        assert copies == Counter(expected[router_id].keys()), f"multicast from {router}"
