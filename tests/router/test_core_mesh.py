"""RouterCore across a mesh (its rule 6), driven by events through the recording Edge: no sockets.

The core under test is router A of this mesh, with a data link to each neighbour (B and C):

    A-B 1, A-C 1, B-D 1, C-D 1, C-E 2    so from A: B 1 via B, C 1 via C, D 2 via B or C, E 3 via C

The mesh's view arrives as `remote_changed` (which other routers have consumers for an address) and
`set_routes` (costs, next hops, multicast trees, computed here by meshbus.mesh.path from the graph above).
Deliveries from another router arrive on an anonymous producer link with their ingress and trace.
"""

from __future__ import annotations

from collections import Counter

import pytest

from meshbus.mesh.path import compute_paths
from meshbus.router.addressing import AddressRule, Distribution, DistributionRules
from meshbus.router.core import (
    ACCEPTED,
    CONSUMER_LOST,
    MAX_HOPS,
    MODIFIED_KIND,
    PRESETTLED_QUEUE_LIMIT,
    RELEASED,
    AttachError,
    ConsumerLink,
    Outcome,
    ProducerLink,
    rejected,
)
from tests.router.conftest import CAPACITY, NOW, Router, alternates

GRAPH = {
    "A": {"B": 1, "C": 1},
    "B": {"A": 1, "D": 1},
    "C": {"A": 1, "D": 1, "E": 2},
    "D": {"B": 1, "C": 1},
    "E": {"C": 2},
}
PATHS = compute_paths(GRAPH, "A")
REJECTED = rejected("amqp:internal-error", "consumer failed")
MODIFIED = Outcome(MODIFIED_KIND, delivery_failed=True)


class RecordingWatcher:
    """A Watcher that records what it is told, as (kind, address, present)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool]] = []

    def local_consumers(self, address: str, present: bool) -> None:
        self.events.append(("local", address, present))

    def reachable(self, address: str, present: bool) -> None:
        self.events.append(("reachable", address, present))


def router_link(router: Router, neighbour: str, credit: int = 100) -> ConsumerLink:
    """A data link from the router to a neighbour, which has given it this much credit."""
    link = router.core.attach_router_link(object(), neighbour)
    router.credit(link, credit)
    return link


def link_to(router: Router, neighbour: str) -> ConsumerLink:
    (link,) = router.core.router_links[neighbour]
    return link


def from_mesh(router: Router) -> ProducerLink:
    """The link on which a neighbour sends to the router (anonymous: each delivery names its address)."""
    return router.producer(None)


@pytest.fixture
def a() -> Router:
    """Router A of the mesh above, with its routes and a data link to B and to C."""
    router = Router(router_id="A")
    router.core.set_routes(PATHS.routes, PATHS.multicast)
    for neighbour in ("B", "C"):
        router_link(router, neighbour)
    return router


def test_the_mesh_paths_are_those_the_tests_assume():
    assert {router: (route.cost, route.next_hops) for router, route in PATHS.routes.items()} == {
        "B": (1, ("B",)),
        "C": (1, ("C",)),
        "D": (2, ("B", "C")),
        "E": (3, ("C",)),
    }
    assert PATHS.multicast["A"] == {"B", "C"}
    assert PATHS.multicast["B"] == {"C"}


# -- credit and watchers -----------------------------------------------------------------------------


def test_producer_gets_credit_when_another_router_has_consumers_and_loses_it_when_none_has(a):
    producer = a.producer("work")
    assert a.edge.granted(producer) == []
    a.core.remote_changed("work", frozenset({"D"}))
    assert a.edge.granted(producer) == [CAPACITY]
    a.core.remote_changed("work", frozenset({"D", "E"}))
    assert a.edge.granted(producer) == [CAPACITY]  # one more router adds none
    assert a.edge.withdrawals == []
    a.core.remote_changed("work", frozenset())
    assert a.edge.withdrawals == [producer]
    assert producer.credit == 0


def test_remote_consumers_leaving_while_local_ones_stay_keep_the_credit(a):
    producer = a.producer("work")
    a.consumer("work")
    a.core.remote_changed("work", frozenset({"D"}))
    a.core.remote_changed("work", frozenset())
    assert a.edge.withdrawals == []
    assert a.edge.granted(producer) == [CAPACITY]


LOCAL_ON, LOCAL_OFF = ("local", "work", True), ("local", "work", False)
REACHABLE_ON, REACHABLE_OFF = ("reachable", "work", True), ("reachable", "work", False)
ON_AND_OFF = [LOCAL_ON, REACHABLE_ON, LOCAL_OFF, REACHABLE_OFF]  # consumers came here first, then none left


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["consumer+", "consumer+", "consumer-", "consumer-"], ON_AND_OFF),
        (["D+", "E+", "D-", "E-"], [REACHABLE_ON, REACHABLE_OFF]),
        (["consumer+", "D+", "consumer-", "D-"], ON_AND_OFF),
        (["D+", "consumer+", "D-", "consumer-"], [REACHABLE_ON, LOCAL_ON, LOCAL_OFF, REACHABLE_OFF]),
    ],
    ids=["local", "remote", "local-first", "remote-first"],
)
def test_watchers_see_each_transition_once(a, steps, expected):
    """Steps: a local consumer attaches (consumer+) or the last attached detaches (consumer-); a router
    gains (D+) or loses (D-) consumers for the address, in the mesh's view."""
    watcher = RecordingWatcher()
    a.core.watchers.append(watcher)
    consumers: list[ConsumerLink] = []
    remote: set[str] = set()
    for step in steps:
        if step == "consumer+":
            consumers.append(a.consumer("work"))
        elif step == "consumer-":
            a.core.detach_consumer(consumers.pop(), NOW)
        else:
            (remote.add if step.endswith("+") else remote.discard)(step[0])
            a.core.remote_changed("work", frozenset(remote))
    assert watcher.events == expected


# -- closest -----------------------------------------------------------------------------------------


def test_closest_prefers_a_local_consumer_to_another_router(a):
    local = a.consumer("near/x", credit=5)
    a.core.remote_changed("near/x", frozenset({"B"}))
    producer = a.producer("near/x")
    for _ in range(3):
        assert a.edge.receivers(a.send(producer)) == [local]


def test_closest_without_a_local_consumer_goes_to_the_lowest_cost_router_by_its_canonical_next_hop(a):
    a.core.remote_changed("near/x", frozenset({"D", "E"}))  # D costs 2 (via B, or C), E 3 (via C)
    producer = a.producer("near/x")
    for _ in range(3):
        assert a.edge.receivers(a.send(producer)) == [link_to(a, "B")]


def test_closest_routers_at_equal_cost_take_turns(a):
    a.core.remote_changed("near/x", frozenset({"B", "C"}))
    producer = a.producer("near/x")
    order = [link for _ in range(4) for link in a.edge.receivers(a.send(producer))]
    assert alternates(order)
    assert Counter(link.router for link in order) == {"B": 2, "C": 2}


def test_a_router_in_the_trace_is_never_chosen(a):
    a.core.remote_changed("near/x", frozenset({"B", "C"}))
    producer = from_mesh(a)
    for _ in range(3):
        delivery = a.send(producer, to="near/x", ingress="B", trace=("B",))
        assert a.edge.receivers(delivery) == [link_to(a, "C")]


def test_a_next_hop_in_the_trace_is_skipped(a):
    a.core.remote_changed("near/x", frozenset({"D"}))  # D: via B (canonical) or C
    delivery = a.send(from_mesh(a), to="near/x", ingress="B", trace=("B",))
    assert a.edge.receivers(delivery) == [link_to(a, "C")]


def assert_released_at_once(
    router: Router, address: str, ingress: str | None = None, trace: tuple[str, ...] = ()
) -> None:
    """A delivery sent to the address is released at once, not sent, and counted."""
    delivery = router.send(from_mesh(router), to=address, ingress=ingress, trace=trace)
    assert router.edge.receivers(delivery) == []
    assert router.edge.outcome(delivery) == RELEASED
    assert router.core.counters.released_no_consumer == 1


def test_every_next_hop_in_the_trace_releases(a):
    a.core.remote_changed("near/x", frozenset({"D"}))
    assert_released_at_once(a, "near/x", ingress="B", trace=("B", "C"))


@pytest.mark.parametrize("address", ["near/x", "work"])
def test_a_router_without_route_releases(a, address):
    a.core.remote_changed(address, frozenset({"F"}))  # F has consumers, but no path to it is known
    assert_released_at_once(a, address)


@pytest.mark.parametrize("address", ["near/x", "work"])
def test_a_router_without_a_data_link_to_its_next_hop_releases(a, address):
    a.core.detach_consumer(link_to(a, "C"), NOW)
    a.core.remote_changed(address, frozenset({"E"}))  # E is reached through C only
    assert_released_at_once(a, address)


# -- balanced ----------------------------------------------------------------------------------------


def test_balanced_weighs_local_unsettled_against_a_routers_unsettled_plus_cost(a):
    local = a.consumer("work", credit=10)
    a.core.remote_changed("work", frozenset({"B"}))  # cost 1
    producer = a.producer("work")
    to_b = link_to(a, "B")
    # B's score: cost 1 plus its unsettled deliveries. Local loads 0, 1 <= 1: local; 2 > 1: B (now 2);
    # 2 <= 2: local; 3 > 2: B
    order = [a.edge.receivers(a.send(producer)) for _ in range(5)]
    assert order == [[local], [local], [to_b], [local], [to_b]]


def test_balanced_sends_to_a_router_what_no_consumer_here_can_take_now(a):
    stopping = a.consumer("work")  # no credit and nothing unsettled: it would win on load alone
    a.core.remote_changed("work", frozenset({"B"}))
    producer = a.producer("work")
    to_b = link_to(a, "B")
    assert [a.edge.receivers(a.send(producer)) for _ in range(2)] == [[to_b], [to_b]]
    assert not stopping.queue


def test_balanced_counts_deliveries_toward_a_router_until_their_outcome_settles(a):
    a.core.remote_changed("work", frozenset({"D"}))
    entry = a.core.entries["work"]
    producer = a.producer("work")
    first, second = a.send(producer), a.send(producer)
    assert entry.toward == {"D": 2}
    to_b = link_to(a, "B")
    a.settle(to_b, first)
    assert entry.toward == {"D": 1}
    a.settle(to_b, second, RELEASED)
    assert entry.toward == {}
    assert [a.edge.outcome(first), a.edge.outcome(second)] == [ACCEPTED, RELEASED]


def test_balanced_accounting_comes_down_when_the_router_link_detaches(a):
    a.core.remote_changed("work", frozenset({"D"}))
    entry = a.core.entries["work"]
    producer = a.producer("work")
    deliveries = [a.send(producer), a.send(producer)]
    a.core.detach_consumer(link_to(a, "B"), NOW)
    assert entry.toward == {}
    assert [a.edge.outcome(d) for d in deliveries] == [CONSUMER_LOST, CONSUMER_LOST]


def test_balanced_routers_share_by_unsettled_deliveries(a):
    a.core.remote_changed("work", frozenset({"B", "C"}))
    producer = a.producer("work")
    first = a.send(producer)
    (busy,) = a.edge.receivers(first)
    idle = link_to(a, "C" if busy.router == "B" else "B")
    assert a.edge.receivers(a.send(producer)) == [idle]
    a.settle(busy, first)
    assert a.edge.receivers(a.send(producer)) == [busy]


# -- multicast ---------------------------------------------------------------------------------------


def test_multicast_from_here_copies_to_local_consumers_and_down_this_routers_tree(a):
    local = a.consumer("multi/x", credit=5)
    a.core.remote_changed("multi/x", frozenset({"D"}))
    delivery = a.send(a.producer("multi/x"))
    assert Counter(a.edge.receivers(delivery)) == {local: 1, link_to(a, "B"): 1, link_to(a, "C"): 1}


def test_multicast_from_another_router_copies_down_the_ingress_tree(a):
    local = a.consumer("multi/x", credit=5)
    a.core.remote_changed("multi/x", frozenset({"D"}))
    delivery = a.send(from_mesh(a), to="multi/x", ingress="B", trace=("B",))  # B's tree: A -> C
    assert Counter(a.edge.receivers(delivery)) == {local: 1, link_to(a, "C"): 1}


def test_multicast_skips_tree_neighbours_in_the_trace(a):
    a.core.set_routes(PATHS.routes, {"D": frozenset({"B", "C"})})  # trees that disagree while converging
    local = a.consumer("multi/x", credit=5)
    a.core.remote_changed("multi/x", frozenset({"E"}))
    delivery = a.send(from_mesh(a), to="multi/x", ingress="D", trace=("D", "B"))
    assert Counter(a.edge.receivers(delivery)) == {local: 1, link_to(a, "C"): 1}


@pytest.mark.parametrize(
    ("local_outcome", "remote_outcome", "expected"),
    [
        (ACCEPTED, ACCEPTED, ACCEPTED),
        (RELEASED, ACCEPTED, ACCEPTED),
        (ACCEPTED, MODIFIED, ACCEPTED),
        (ACCEPTED, REJECTED, REJECTED),
        (REJECTED, ACCEPTED, REJECTED),
        (RELEASED, MODIFIED, RELEASED),
    ],
)
def test_multicast_outcome_combines_local_and_remote_copies(a, local_outcome, remote_outcome, expected):
    local = a.consumer("multi/x", credit=5)
    a.core.remote_changed("multi/x", frozenset({"D"}))
    delivery = a.send(from_mesh(a), to="multi/x", ingress="B", trace=("B",))
    a.settle(local, delivery, local_outcome)
    assert a.edge.settles == []
    a.settle(link_to(a, "C"), delivery, remote_outcome)
    assert a.edge.outcome(delivery) == expected


def trace_of(length: int) -> tuple[str, ...]:
    """A trace of that many routers that entered the mesh at B."""
    return ("B", *(f"R{i}" for i in range(length - 1)))


@pytest.mark.parametrize(("hops", "copied"), [(MAX_HOPS - 2, True), (MAX_HOPS - 1, False)])
def test_multicast_copies_to_no_other_router_once_max_hops_is_reached(a, hops, copied):
    local = a.consumer("multi/x", credit=5)
    a.core.remote_changed("multi/x", frozenset({"D"}))
    delivery = a.send(from_mesh(a), to="multi/x", ingress="B", trace=trace_of(hops))
    expected = [local, link_to(a, "C")] if copied else [local]
    assert a.edge.receivers(delivery) == expected


def test_multicast_at_max_hops_without_local_consumers_is_released(a):
    a.core.remote_changed("multi/x", frozenset({"D"}))
    assert_released_at_once(a, "multi/x", ingress="B", trace=trace_of(MAX_HOPS - 1))


def test_unicast_at_max_hops_is_released(a):
    a.core.remote_changed("near/x", frozenset({"E"}))
    assert_released_at_once(a, "near/x", ingress="D", trace=("D", *trace_of(MAX_HOPS - 2)))


# -- dynamic addresses of other routers --------------------------------------------------------------

E_DYNAMIC = "_dynamic/E/7.3"


def test_anonymous_delivery_to_another_routers_dynamic_address_goes_toward_it(a):
    delivery = a.send(a.producer(None), to=E_DYNAMIC)
    assert a.edge.receivers(delivery) == [link_to(a, "C")]
    a.settle(link_to(a, "C"), delivery)
    assert a.edge.outcome(delivery) == ACCEPTED


@pytest.mark.parametrize(
    "address", ["_dynamic/F/1.1", "_dynamic/A/1.1"], ids=["unknown-router", "this-router"]
)
def test_anonymous_delivery_to_an_unreachable_dynamic_address_is_released(a, address):
    assert_released_at_once(a, address)


def test_producer_on_another_routers_dynamic_address_has_credit_while_that_router_is_reachable(a):
    producer = a.producer(E_DYNAMIC)
    assert a.edge.granted(producer) == [CAPACITY]
    without_e = {router: route for router, route in PATHS.routes.items() if router != "E"}
    a.core.set_routes(without_e, PATHS.multicast)
    assert a.edge.withdrawals == [producer]
    a.core.set_routes(PATHS.routes, PATHS.multicast)
    assert a.edge.granted(producer) == [CAPACITY, CAPACITY]
    assert a.edge.receivers(a.send(producer)) == [link_to(a, "C")]


def test_producer_on_an_unreachable_routers_dynamic_address_waits_for_a_route_to_it(a):
    producer = a.producer("_dynamic/F/1.1")
    assert a.edge.granted(producer) == []
    routes = {**PATHS.routes, "F": PATHS.routes["E"]}
    a.core.set_routes(routes, PATHS.multicast)
    assert a.edge.granted(producer) == [CAPACITY]


def test_watchers_see_another_routers_dynamic_address_come_and_go_with_that_router(a):
    watcher = RecordingWatcher()
    a.core.watchers.append(watcher)
    a.producer(E_DYNAMIC)
    without_e = {router: route for router, route in PATHS.routes.items() if router != "E"}
    a.core.set_routes(without_e, PATHS.multicast)
    a.core.set_routes(PATHS.routes, PATHS.multicast)
    assert watcher.events == [
        ("reachable", E_DYNAMIC, True),
        ("reachable", E_DYNAMIC, False),
        ("reachable", E_DYNAMIC, True),
    ]


@pytest.mark.parametrize("rule", [Distribution.MULTICAST, Distribution.UNAVAILABLE])
def test_producer_on_another_routers_dynamic_address_is_not_subject_to_the_address_rules(rule):
    router = Router(DistributionRules([AddressRule(pattern="#", distribution=rule)]), router_id="A")
    router.core.set_routes(PATHS.routes, PATHS.multicast)
    to_b, to_c = router_link(router, "B"), router_link(router, "C")
    try:
        producer = router.producer(E_DYNAMIC)
    except AttachError:
        producer = None
    assert producer is not None, "the attach was refused"
    assert router.edge.receivers(router.send(producer)) == [to_c]
    assert router.edge.sent_to(to_b) == []


# -- router links ------------------------------------------------------------------------------------


def test_router_link_detach_fails_in_flight_deliveries_and_releases_queued_ones(a):
    a.core.remote_changed("near/x", frozenset({"B"}))
    to_b = link_to(a, "B")
    a.credit(to_b, 1)
    producer = a.producer("near/x")
    sent, queued = a.send(producer), a.send(producer)
    assert a.edge.sent_to(to_b) == [sent] and list(to_b.queue) == [queued]
    a.core.detach_consumer(to_b, NOW)
    assert a.edge.outcome(sent) == CONSUMER_LOST
    assert a.edge.outcome(queued) == RELEASED
    assert "B" not in a.core.router_links
    assert producer.held == 0


def test_router_links_to_a_neighbour_are_forgotten_with_the_last_of_them(a):
    a.core.remote_changed("near/x", frozenset({"B"}))
    first = link_to(a, "B")
    second = router_link(a, "B")
    a.core.detach_consumer(first, NOW)
    assert a.core.router_links["B"] == [second]
    assert a.edge.receivers(a.send(a.producer("near/x"))) == [second]
    a.core.detach_consumer(second, NOW)
    assert "B" not in a.core.router_links


def test_router_link_detach_leaves_the_addresses_local_consumers_alone(a):
    watcher = RecordingWatcher()
    a.core.watchers.append(watcher)
    a.consumer("work")
    a.core.detach_consumer(link_to(a, "B"), NOW)
    assert watcher.events == [LOCAL_ON, REACHABLE_ON]


@pytest.mark.parametrize("ended_by", ["producer-abort", "edge-refusal"])
def test_a_dropped_delivery_queued_on_a_router_link_is_never_sent(a, ended_by):
    a.core.remote_changed("near/x", frozenset({"B"}))
    to_b = link_to(a, "B")
    a.credit(to_b, 0)
    delivery = a.send(a.producer("near/x"), complete=False)
    assert list(to_b.queue) == [delivery]
    if ended_by == "producer-abort":
        a.core.abort(delivery)
    else:
        a.core.refuse(delivery, rejected("amqp:link:message-size-exceeded", "too large"))
    a.credit(to_b, 5)
    assert a.edge.sent_to(to_b) == []


def test_clients_cannot_attach_to_the_routers_own_addresses(a):
    with pytest.raises(AttachError, match="_mesh/"):
        a.consumer("_mesh/data/B", credit=5)
    with pytest.raises(AttachError, match="_mesh/"):
        a.producer("_mesh/control")


@pytest.mark.parametrize("address", ["near/x", "work", "multi/x"])
def test_a_presettled_delivery_without_a_route_is_counted_as_dropped(a, address):
    a.core.remote_changed(address, frozenset({"F"}))
    a.core.set_routes(PATHS.routes, {})  # and no multicast tree
    a.send(a.producer(address), settled=True)
    assert a.edge.sends == a.edge.settles == []
    assert (a.core.counters.dropped_no_consumer, a.core.counters.released_no_consumer) == (1, 0)


def test_a_refused_delivery_sent_toward_another_router_gives_its_credit_back(a):
    a.core.remote_changed("near/x", frozenset({"B"}))
    producer = a.producer("near/x")
    delivery = a.send(producer, complete=False)
    assert a.edge.receivers(delivery) == [link_to(a, "B")]
    a.core.refuse(delivery, rejected("amqp:link:message-size-exceeded", "too large"))
    a.core.stream_finished(link_to(a, "B"), NOW, aborted=a.edge.handle(link_to(a, "B"), delivery))
    assert producer.held == 0
    assert a.edge.producer_credit[producer] == CAPACITY


@pytest.mark.parametrize("address", ["work", "near/x"])  # balanced, closest
def test_local_pools_each_get_a_copy_and_the_consumers_elsewhere_one_more(a, address):
    first, second = a.consumer(address, credit=5, pool="p1"), a.consumer(address, credit=5, pool="p2")
    a.core.remote_changed(address, frozenset({"D"}))
    delivery = a.send(a.producer(address))
    receivers = a.edge.receivers(delivery)
    assert receivers[:2] == [first, second]
    assert receivers[2:] in ([link_to(a, "B")], [link_to(a, "C")])


def test_a_delivery_toward_another_router_follows_the_routes_without_knowing_its_address(a):
    """A router that just joined forwards what the ingress sent toward another router, address unknown."""
    delivery = a.send(from_mesh(a), to="not/known/here", ingress="F", trace=("F",), dest="E")
    assert a.edge.receivers(delivery) == [link_to(a, "C")]  # E is reached through C
    assert delivery.dest == "E"


def test_a_delivery_toward_an_unreachable_router_is_routed_by_its_address(a):
    consumer = a.consumer("work", credit=5)
    delivery = a.send(from_mesh(a), to="work", ingress="F", trace=("F",), dest="Z")
    assert a.edge.receivers(delivery) == [consumer]


def test_the_ingress_names_the_router_it_chose(a):
    a.core.remote_changed("near/x", frozenset({"E"}))
    delivery = a.send(a.producer("near/x"))
    assert (a.edge.receivers(delivery), delivery.dest) == ([link_to(a, "C")], "E")


def test_presettled_deliveries_from_another_router_are_shed_past_the_queue_limit(a):
    slow = a.consumer("work")  # no credit: everything waits in its queue
    arriving = from_mesh(a)
    for _ in range(PRESETTLED_QUEUE_LIMIT + 5):
        a.send(arriving, to="work", settled=True, ingress="B", trace=("B",))
    assert len(slow.queue) == PRESETTLED_QUEUE_LIMIT
    assert a.core.counters.dropped_slow_consumer == 5
    a.send(arriving, to="work", ingress="B", trace=("B",))  # unsettled: bounded at its ingress, kept
    assert len(slow.queue) == PRESETTLED_QUEUE_LIMIT + 1
