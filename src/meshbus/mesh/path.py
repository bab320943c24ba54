"""Path computation: next hops and costs to every router, and the multicast trees, from the link-state graph.

Rules of this module:
1. Pure functions of the symmetric graph linkstate.py gives (links both ends report; costs >= 1): no state,
   no clock, no sending. The result is a `Paths` value.
2. Unicast: Dijkstra from this router. For every reachable router, the lowest cost and *all* the neighbours
   that start a lowest-cost path to it, by router id. The first is the canonical next hop (ties go to the
   lowest router id); the forwarding layer may rotate over the others.
3. Multicast: a message from source S travels down S's tree, where every router's parent is its canonical
   next hop toward S. This router forwards S's messages to the neighbours whose canonical next hop toward S
   is this router, found by a Dijkstra from each neighbour over the same graph. Routers with the same graph
   compute the same trees, so each router reachable from S gets exactly one copy and no copy loops (a parent
   is always closer to S). While databases disagree (during convergence) a copy may be lost or doubled: the
   forwarding layer's trace stops loops, and a router may drop copies of S's messages that do not come from
   its parent for S.
4. Cost of `compute_paths`: one Dijkstra from this router and one per neighbour, each O(E log V).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from heapq import heappop, heappush

GraphView = Mapping[str, Mapping[str, int]]  # router -> neighbour -> cost, symmetric


@dataclass(frozen=True, slots=True)
class Route:
    cost: int
    next_hops: tuple[str, ...]  # every neighbour that starts a lowest-cost path, by id; [0] is canonical


@dataclass(frozen=True, slots=True)
class Paths:
    routes: Mapping[str, Route]  # every router reachable from this one, except this one
    multicast: Mapping[
        str, frozenset[str]
    ]  # source (this router included) -> neighbours to forward its copies to


def shortest_paths(graph: GraphView, source: str) -> dict[str, tuple[int, frozenset[str]]]:
    """Dijkstra: every router reachable from `source`, with its cost and the neighbours of `source` that start
    a lowest-cost path to it (none for `source` itself)."""
    costs = {source: 0}
    # Routers on one lowest-cost path share one frozen set of first hops: no copying along the way.
    first_hops: dict[str, frozenset[str]] = {source: frozenset()}
    done: set[str] = set()
    heap = [(0, source)]
    while heap:
        cost, node = heappop(heap)
        if node in done:
            continue
        done.add(node)
        for neighbour, link_cost in graph.get(node, {}).items():
            via = first_hops[node] if node != source else frozenset((neighbour,))
            total = cost + link_cost
            known = costs.get(neighbour)
            if known is None or total < known:
                costs[neighbour] = total
                first_hops[neighbour] = via
                heappush(heap, (total, neighbour))
            elif total == known:  # another lowest-cost path (never to a node already done: costs are >= 1)
                first_hops[neighbour] = first_hops[neighbour] | via
    return {node: (costs[node], first_hops[node]) for node in done}


def compute_paths(graph: GraphView, router_id: str) -> Paths:
    mine = shortest_paths(graph, router_id)
    routes = {
        router: Route(cost, tuple(sorted(hops)))
        for router, (cost, hops) in mine.items()
        if router != router_id
    }
    children: dict[str, set[str]] = {source: set() for source in mine}
    for neighbour in graph.get(router_id, {}):
        for source, (_, hops) in shortest_paths(graph, neighbour).items():
            if hops and min(hops) == router_id:  # this router is the neighbour's parent in the source's tree
                children[source].add(neighbour)
    return Paths(routes, {source: frozenset(targets) for source, targets in children.items()})
