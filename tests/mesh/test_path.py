"""Path computation on given graphs: costs, equal-cost next hops, and multicast trees, against an oracle."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshbus.mesh.node import RoutingTable
from meshbus.mesh.path import Route, compute_paths
from tests.mesh.network import Graph, expected_routes, multicast_copies


def symmetric(*links: tuple[str, str, int]) -> Graph:
    graph: Graph = {}
    for a, b, cost in links:
        graph.setdefault(a, {})[b] = cost
        graph.setdefault(b, {})[a] = cost
    return graph


def tables(graph: Graph) -> dict[str, RoutingTable]:
    result = {}
    for router in graph:
        paths = compute_paths(graph, router)
        result[router] = RoutingTable(router, paths.routes, paths.multicast, {})
    return result


def check_against_oracle(graph: Graph) -> None:
    expected = expected_routes(graph)
    computed = tables(graph)
    for router, table in computed.items():
        assert {far: (route.cost, route.next_hops) for far, route in table.routes.items()} == expected[router]
        copies = multicast_copies(computed, router)
        assert copies == {far: 1 for far in expected[router]}, f"multicast from {router}"


def test_a_line() -> None:
    paths = compute_paths(symmetric(("a", "b", 1), ("b", "c", 2), ("c", "d", 1)), "a")
    assert paths.routes == {"b": Route(1, ("b",)), "c": Route(3, ("b",)), "d": Route(4, ("b",))}
    assert paths.multicast == {"a": {"b"}, "b": set(), "c": set(), "d": set()}


def test_equal_cost_paths_expose_every_next_hop_lowest_id_first() -> None:
    square = symmetric(("a", "c", 1), ("a", "b", 1), ("b", "d", 1), ("c", "d", 1))
    paths = compute_paths(square, "a")
    assert paths.routes["d"] == Route(2, ("b", "c"))
    assert compute_paths(square, "b").multicast["a"] == {"d"}  # d's canonical way back to a is b
    assert compute_paths(square, "c").multicast["a"] == set()


def test_a_cheaper_longer_path_wins() -> None:
    graph = symmetric(("a", "b", 10), ("a", "c", 1), ("c", "d", 1), ("d", "b", 1))
    assert compute_paths(graph, "a").routes["b"] == Route(3, ("c",))
    assert compute_paths(graph, "b").routes["a"] == Route(3, ("d",))


def test_a_lonely_router_reaches_nobody() -> None:
    paths = compute_paths({}, "a")
    assert paths.routes == {}
    assert paths.multicast == {"a": set()}


def test_only_the_connected_part_is_reachable() -> None:
    graph = symmetric(("a", "b", 1), ("c", "d", 1))
    assert set(compute_paths(graph, "a").routes) == {"b"}
    check_against_oracle(graph)


@st.composite
def connected_graphs(draw: st.DrawFn) -> Graph:
    size = draw(st.integers(2, 14))
    names = [f"r{i:02d}" for i in range(size)]
    links = [(names[i], names[draw(st.integers(0, i - 1))], draw(st.integers(1, 4))) for i in range(1, size)]
    extra = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names), st.integers(1, 4))))
    return symmetric(*links, *((a, b, cost) for a, b, cost in extra if a != b))


@settings(max_examples=150, deadline=None)
@given(connected_graphs())
def test_routes_and_trees_agree_with_the_oracle(graph: Graph) -> None:
    check_against_oracle(graph)


def test_a_thousand_routers() -> None:
    rng = random.Random(7)
    names = [f"r{i:04d}" for i in range(1000)]
    links = [(names[i], names[rng.randrange(i)], rng.randint(1, 5)) for i in range(1, 1000)]
    links += [(rng.choice(names), rng.choice(names), rng.randint(1, 5)) for _ in range(1000)]
    graph = symmetric(*((a, b, cost) for a, b, cost in links if a != b))
    paths = compute_paths(graph, names[0])
    assert len(paths.routes) == 999
    assert len(paths.multicast) == 1000
