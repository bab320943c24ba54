"""Meshes of MeshNode objects converging in a simulated network (network.py): topologies, failures, addresses.

Each test builds a mesh, plays simulated time, and compares every running router's routes, multicast trees
and address view with an oracle computed on the surviving graph (`check_converged`). Simulated time makes
the time-outs exact: a test may say "not before the hello time-out, and done soon after it".
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import DuplicateRouterId, NeighbourDown, RouterUnreachable
from meshbus.mesh.messages import LinkStateUpdate, Message, MobileAddressUpdate
from meshbus.mesh.path import Route
from tests.mesh.network import Network, SimRouter, check_converged

CONFIG = MeshConfig()
SETTLE = 1.0  # simulated seconds for hellos, floods and batches to settle when nothing times out


def mesh(links: list[tuple[str, str, int]], **options) -> Network:
    """Routers named after the links' ends, each with one address of its own (svc/<name>); not yet run."""
    network = Network(**options)
    for name in sorted({end for a, b, _ in links for end in (a, b)}):
        network.add(name, addresses=(f"svc/{name}",))
    for a, b, cost in links:
        network.connect(a, b, cost)
    return network


def line(size: int) -> list[tuple[str, str, int]]:
    return [(f"r{i}", f"r{i + 1}", 1) for i in range(size - 1)]


def ring(size: int) -> list[tuple[str, str, int]]:
    return [(f"r{i}", f"r{(i + 1) % size}", 1 + i % 3) for i in range(size)]


def star(size: int) -> list[tuple[str, str, int]]:
    return [("hub", f"r{i}", 1) for i in range(size)]


def random_mesh(size: int, extra: int, seed: int) -> list[tuple[str, str, int]]:
    """A connected random graph: a random tree plus extra links (as many as fit), costs 1-5."""
    rng = random.Random(seed)
    names = [f"r{i:03d}" for i in range(size)]
    links = [(names[i], names[rng.randrange(i)], rng.randint(1, 5)) for i in range(1, size)]
    pairs = {frozenset(link[:2]) for link in links}
    while len(links) < min(size - 1 + extra, size * (size - 1) // 2):
        a, b = rng.sample(names, 2)
        if frozenset((a, b)) not in pairs:
            pairs.add(frozenset((a, b)))
            links.append((a, b, rng.randint(1, 5)))
    return links


def route(router: SimRouter, far: str) -> tuple[int, tuple[str, ...]] | None:
    found = router.table.routes.get(far)
    return None if found is None else (found.cost, found.next_hops)


# -- topologies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "links",
    [line(8), ring(9), star(12), random_mesh(30, 20, seed=1), random_mesh(40, 60, seed=2)],
    ids=["line", "ring", "star", "random-sparse", "random-dense"],
)
def test_converges(links: list[tuple[str, str, int]]) -> None:
    network = mesh(links)
    network.run(SETTLE)
    check_converged(network)


def test_once_converged_only_hellos_and_summaries_flow() -> None:
    network = mesh(ring(6))
    network.run(SETTLE)
    network.sent.clear()
    network.run(10.0)
    assert set(network.sent) == {"HELLO", "RA"}
    check_converged(network)


def test_a_two_router_table_for_the_forwarding_layer() -> None:
    network = mesh([("a", "b", 3)])
    network.run(SETTLE)
    a = network.routers["a"]
    [end] = a.ends
    assert a.table.routes == {"b": Route(3, ("b",))}
    assert a.table.links == {"b": end}
    assert a.table.link_to("b") == end
    assert a.table.link_to("c") is None
    assert a.table.multicast_links("a") == [end]
    assert a.table.multicast_links("b") == []
    assert a.addresses == {"svc/b": {"b"}}
    assert a.node.addresses() == {"svc/b": {"b"}}
    assert a.node.routers_for("svc/b") == {"b"}


# -- changes and failures ----------------------------------------------------------------------------------


def test_a_cost_change_reroutes() -> None:
    network = mesh([("a", "b", 1), ("b", "c", 1), ("a", "d", 1), ("d", "c", 1)])
    network.run(SETTLE)
    a = network.routers["a"]
    assert route(a, "c") == (2, ("b", "d"))
    network.set_cost(network.links[0], 5)  # a-b
    network.run(SETTLE)
    assert route(a, "c") == (2, ("d",))
    assert route(a, "b") == (3, ("d",))
    check_converged(network)


def test_a_cost_set_on_one_end_counts_for_both() -> None:
    network = mesh([("a", "b", 1), ("b", "c", 1), ("a", "c", 1)])
    network.set_cost(network.links[2], 1, cost_b=5)  # only c's end of a-c is dear
    network.run(SETTLE)
    assert route(network.routers["a"], "c") == (2, ("b",))
    assert route(network.routers["c"], "a") == (2, ("b",))
    check_converged(network)


def triangle() -> Network:
    """a-b-c cheap through b, a-c dear: traffic a->c goes through b until b fails."""
    network = mesh([("a", "b", 1), ("b", "c", 1), ("a", "c", 5)])
    network.run(SETTLE)
    assert route(network.routers["a"], "c") == (2, ("b",))
    return network


def test_a_killed_router_is_routed_around_at_once() -> None:
    network = triangle()
    network.kill("b")
    network.run(CONFIG.batch_delay + 0.01)  # the batch, and the flood over one link
    a = network.routers["a"]
    assert route(a, "c") == (5, ("c",))
    network.run(CONFIG.batch_delay + 0.01)  # c's news that b is gone
    assert a.addresses == {"svc/c": {"c"}}
    assert NeighbourDown("b", network.links[0].end(0), "connection closed") in a.events
    check_converged(network)


def test_a_silent_router_is_declared_dead_after_the_hello_timeout() -> None:
    network = triangle()
    network.silence("b")
    network.run(CONFIG.hello_timeout - CONFIG.hello_interval - 0.01)  # b's last hello may be that old
    a = network.routers["a"]
    assert route(a, "c") == (2, ("b",))
    network.run(CONFIG.hello_interval + 0.1)
    assert route(a, "c") == (5, ("c",))
    assert RouterUnreachable("b") in a.events
    assert any(isinstance(e, NeighbourDown) and e.reason == "silent for 1.5 s" for e in a.events)
    check_converged(network)


def test_a_partition_and_its_healing() -> None:
    left = [("a1", "a2", 1), ("a2", "a3", 1), ("a3", "a1", 1)]
    right = [("b1", "b2", 1), ("b2", "b3", 2), ("b3", "b1", 1)]
    network = mesh([*left, *right, ("a1", "b1", 1), ("a3", "b3", 4)])
    network.run(SETTLE)
    check_converged(network)
    bridges = network.links[-2:]
    for bridge in bridges:
        network.cut(bridge)
    network.run(CONFIG.hello_timeout + SETTLE)
    check_converged(network)
    assert set(network.routers["a2"].table.routes) == {"a1", "a3"}
    assert set(network.routers["a2"].addresses) == {"svc/a1", "svc/a3"}
    network.add_address("b2", "svc/new")  # a change the other side cannot hear of
    network.run(SETTLE)
    for bridge in bridges:
        network.heal(bridge)
    network.run(SETTLE)
    check_converged(network)
    assert network.routers["a2"].addresses["svc/new"] == {"b2"}


def test_a_partition_healing_after_the_other_side_was_purged() -> None:
    network = mesh([("a1", "a2", 1), ("a2", "b1", 1), ("b1", "b2", 1)])
    network.run(SETTLE)
    network.disconnect(network.links[1])
    network.run(CONFIG.purge_after + SETTLE)
    assert set(network.routers["a1"].node.known_routers()) == {"a1", "a2"}
    network.connect("a2", "b1", 2)
    network.run(SETTLE)
    check_converged(network)


def test_state_held_while_unreachable_reaches_the_neighbours_that_lack_it() -> None:
    """b keeps a's state while a is cut off; c joins b meanwhile. When a is back, c must get a's (unchanged)
    addresses from b at once, not at the next periodic summary."""
    network = mesh([("a", "b", 1)])
    network.run(SETTLE)
    network.disconnect(network.links[0])
    network.run(SETTLE)
    network.add("c", addresses=("svc/c",))
    network.connect("c", "b")
    network.run(SETTLE)
    network.connect("a", "b")
    network.run(SETTLE)
    assert network.routers["c"].addresses == {"svc/a": {"a"}, "svc/b": {"b"}}
    check_converged(network)


def test_what_a_silently_lost_link_carried_is_resent_on_the_link_left() -> None:
    """a and b have two links; the cheaper one dies silently and takes b's news with it."""
    network = mesh([("a", "b", 2), ("b", "c", 1)], config=MeshConfig(advertise_interval=60.0))
    cheap = network.connect("a", "b", 1)
    network.run(SETTLE)
    network.cut(cheap)
    network.add_address("c", "svc/new")
    network.run(CONFIG.hello_timeout + SETTLE)
    assert network.routers["a"].addresses["svc/new"] == {"c"}
    check_converged(network)


def test_a_restarted_router_is_known_by_its_new_life() -> None:
    network = triangle()
    network.restart("b")
    network.remove_address("b", "svc/b")
    network.add_address("b", "svc/b2")
    network.run(SETTLE)
    check_converged(network)
    assert network.routers["a"].addresses == {"svc/b2": {"b"}, "svc/c": {"c"}}


# -- duplicate router ids ----------------------------------------------------------------------------------


def duplicates(router: SimRouter) -> list[DuplicateRouterId]:
    return [event for event in router.events if isinstance(event, DuplicateRouterId)]


def test_two_neighbours_with_one_id_are_reported_once_and_not_merged() -> None:
    network = Network()
    network.add("a")
    network.add("b1", router_id="b", addresses=("svc/b1",))
    network.add("b2", router_id="b", addresses=("svc/b2",))
    network.connect("a", "b1")
    network.run(SETTLE)
    network.connect("a", "b2")
    network.run(3 * CONFIG.hello_timeout)
    a = network.routers["a"]
    [report] = duplicates(a)
    assert report.router_id == "b" and report.instance == network.routers["b2"].node.instance
    assert a.table.link_to("b") == network.links[0].end(0)  # the first b stays
    assert a.addresses == {"svc/b1": {"b"}}


def test_two_distant_routers_with_one_id_are_reported() -> None:
    network = Network()
    for name in ("x1", "m1", "m2", "x2"):
        network.add(name, router_id=name[0] if name.startswith("x") else name)
    network.connect("x1", "m1")
    network.connect("m1", "m2")
    network.connect("m2", "x2")
    network.run(SETTLE)
    reports = [r for router in network.routers.values() for r in duplicates(router)]
    assert reports and {r.router_id for r in reports} == {"x"}
    assert all(len(duplicates(router)) <= 1 for router in network.routers.values())


def test_a_router_connected_to_itself_is_reported() -> None:
    network = Network()
    network.add("a")
    network.connect("a", "a")
    network.run(SETTLE)
    [report] = duplicates(network.routers["a"])
    assert report.detail == "this router is connected to itself"
    assert network.routers["a"].table.routes == {}


# -- addresses ---------------------------------------------------------------------------------------------


def test_addresses_come_and_go_with_their_consumers() -> None:
    network = mesh(line(4))
    network.run(SETTLE)
    far = network.routers["r0"]
    network.add_address("r2", "shared")
    network.add_address("r3", "shared")
    network.run(SETTLE)
    assert far.addresses["shared"] == {"r2", "r3"}
    network.remove_address("r3", "shared")
    network.run(SETTLE)
    assert far.addresses["shared"] == {"r2"}
    network.remove_address("r2", "shared")
    network.run(SETTLE)
    assert "shared" not in far.addresses
    check_converged(network)


def dropping(kind: type[Message], sender: str, receiver: str, count: int = 1):
    """A drop predicate losing the next `count` messages of this kind from sender to receiver."""
    left = [count]

    def drop(source: SimRouter, target: SimRouter, message: Message) -> bool:
        if isinstance(message, kind) and (source.name, target.name) == (sender, receiver) and left[0]:
            left[0] -= 1
            return True
        return False

    return drop


def test_a_missed_address_update_is_resynced_at_the_next_one() -> None:
    network = mesh(line(4))
    network.run(SETTLE)
    network.drop = dropping(MobileAddressUpdate, "r1", "r2")
    network.add_address("r0", "first")
    network.run(SETTLE)
    assert "first" not in network.routers["r3"].addresses  # lost on the way
    network.sent.clear()
    network.add_address("r0", "second")
    network.run(SETTLE)
    assert network.sent["MAR"] == 1  # r2 saw the gap and asked r1
    check_converged(network)


def test_a_missed_last_update_is_caught_up_by_the_next_summary() -> None:
    network = mesh(line(3))
    network.run(SETTLE)
    network.drop = dropping(MobileAddressUpdate, "r0", "r1")
    network.add_address("r0", "late")
    network.run(SETTLE)
    assert "late" not in network.routers["r2"].addresses
    network.run(CONFIG.advertise_interval)
    check_converged(network)


def test_a_missed_link_state_update_is_caught_up_by_the_next_summary() -> None:
    network = mesh([("a", "b", 1), ("b", "c", 1), ("c", "d", 1), ("d", "a", 1)])
    network.run(SETTLE)
    network.drop = lambda sender, receiver, message: isinstance(message, LinkStateUpdate)
    network.set_cost(network.links[0], 3)  # a-b
    network.run(SETTLE)
    assert route(network.routers["c"], "a") == (2, ("b", "d"))  # c did not hear of it
    network.drop = lambda sender, receiver, message: False
    network.run(CONFIG.advertise_interval)
    check_converged(network)
    assert route(network.routers["c"], "a") == (2, ("d",))


# -- any sequence of joins and failures --------------------------------------------------------------------

OPERATIONS = st.one_of(
    st.tuples(st.just("join"), st.lists(st.integers(0, 99), min_size=1, max_size=3), st.integers(1, 4)),
    st.tuples(st.just("connect"), st.integers(0, 99), st.integers(0, 99), st.integers(1, 4)),
    st.tuples(st.sampled_from(["disconnect", "cut"]), st.integers(0, 999), st.just(0)),
    st.tuples(st.just("cost"), st.integers(0, 999), st.integers(1, 4)),
    st.tuples(st.sampled_from(["kill", "silence", "restart", "address"]), st.integers(0, 99), st.just(0)),
)
PAUSES = st.sampled_from([0.0, 0.003, 0.05, 0.4, 2.0])  # mid-flood, mid-batch, mid-time-out, settled


def apply(network: Network, operation: tuple[Any, ...], joined: list[int]) -> None:
    kind, first, second = operation[0], operation[1], operation[2]
    running = sorted(network.running(), key=lambda router: router.name)
    links = [link for link in network.links if link.up and not link.cut]
    if kind == "join":
        name = f"n{len(joined)}"
        joined.append(1)
        network.add(name, addresses=(f"svc/{name}",))
        for index in set(first):
            network.connect(name, running[index % len(running)].name, second)
    elif kind == "connect":
        a, b = running[first % len(running)], running[second % len(running)]
        if a is not b:
            network.connect(a.name, b.name, operation[3])
    elif kind in ("disconnect", "cut", "cost") and links:
        link = links[first % len(links)]
        if kind == "disconnect":
            network.disconnect(link)
        elif kind == "cut":
            network.cut(link)
        else:
            network.set_cost(link, second)
    elif kind in ("kill", "silence", "restart", "address") and len(running) > 1:
        router = running[first % len(running)]
        if kind == "kill":
            network.kill(router.name)
        elif kind == "silence":
            network.silence(router.name)
        elif kind == "restart":
            network.restart(router.name)
        elif "shared" in router.local:
            network.remove_address(router.name, "shared")
        else:
            network.add_address(router.name, "shared")


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 6),
    st.lists(st.tuples(OPERATIONS, PAUSES), max_size=12),
    st.integers(0, 2**32),
    st.booleans(),
)
def test_after_any_joins_and_failures_the_tables_agree_with_dijkstra(
    size: int, operations: list[tuple[tuple[Any, ...], float]], seed: int, lossy: bool
) -> None:
    """Lossy: while the operations run, a tenth of all messages are lost; then the mesh must catch up."""
    network = mesh(random_mesh(size, 1, seed), seed=seed)
    rng = random.Random(seed)
    if lossy:
        network.drop = lambda sender, receiver, message: rng.random() < 0.1
    joined: list[int] = []
    for operation, pause in operations:
        apply(network, operation, joined)
        network.run(pause)
    network.drop = lambda sender, receiver, message: False
    # A silenced router is noticed after the hello time-out; what loss hid, after two summaries at most.
    network.run(CONFIG.hello_timeout + SETTLE + (2 * CONFIG.advertise_interval if lossy else 0.0))
    check_converged(network)


# -- scale -------------------------------------------------------------------------------------------------


def test_two_hundred_routers_converge() -> None:
    network = mesh(random_mesh(200, 100, seed=3), wire=False)
    network.run(SETTLE)
    check_converged(network)
    network.kill("r100")
    network.run(SETTLE)
    check_converged(network)
    network.kill("r100")
    network.run(SETTLE)
    check_converged(network)
